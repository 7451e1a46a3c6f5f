"""Synchronised batch norm on ``fnevr.ops.spade_norm``: the statistics (and their gradients) are
reduced across a process group, as ``torch.nn.SyncBatchNorm`` does, but on CPU tensors too (gloo),
where torch's refuses to run. ``fnevr train`` converts the model's BatchNorm layers to it under DDP
on CPUs; on GPUs it uses torch's.
"""

import torch.distributed as dist
from torch import Tensor, nn

from ..ops import spade_norm
from ..ops.spade_norm import check_eps


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm{1,2,3}d (same arguments, parameters and buffers) for ``[N, C, ...]`` input.

    In training the mean and variance come from the whole batch of every process in
    ``process_group`` (default: the default group when ``torch.distributed`` is initialised, else
    this process alone); in eval the running statistics are used. ``y = norm(x) * weight + bias``
    is one ``spade_norm`` with ``gamma = weight - 1`` and ``beta = bias``, broadcast per channel.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        backend: str = "auto",
    ):
        check_eps(eps, "SyncBatchNorm")  # here, not at the first forward (which checks it too)
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group, self.ops_backend = process_group, backend

    def _check_input_dim(self, input: Tensor):
        if input.dim() < 3:
            raise ValueError(
                f"SyncBatchNorm: expected [N, C, ...] input with at least 3 dims, got {tuple(input.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        group = self.process_group
        if (
            group is None
            and (self.training or self.running_mean is None)
            and dist.is_available()
            and dist.is_initialized()
        ):
            group = dist.group.WORLD
        return batch_norm(self, x, process_group=group, backend=self.ops_backend)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every BatchNorm layer replaced by this class (parameters, buffers and
        mode kept), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, process_group))
        return module


def batch_norm(
    bn: nn.modules.batchnorm._BatchNorm,
    x: Tensor,
    *,
    process_group=None,
    backend: str = "auto",
    count_batches: bool = True,
) -> Tensor:
    """The forward of batch-norm layer ``bn`` (its parameters, buffers, momentum and mode) on
    ``x`` ``[N, C, ...]``, as one ``spade_norm``: :class:`SyncBatchNorm`'s, and through
    :func:`fnevr.patch` other code's layers. In training the statistics are reduced over
    ``process_group`` (None: this process alone); ``count_batches=False`` leaves
    ``num_batches_tracked`` as it is (for layers whose own forward does not count)."""
    N, C = x.shape[:2]
    momentum = bn.momentum
    if count_batches and bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or bn.running_mean is None
    x4 = x if x.dim() == 4 else x.reshape(N, C, -1, 1)
    # (under autocast x may be bf16 while the parameters stay fp32)
    gamma = (bn.weight - 1).view(1, C, 1, 1).to(x.dtype) if bn.affine else x4.new_zeros(1, C, 1, 1)
    beta = bn.bias.view(1, C, 1, 1).to(x.dtype) if bn.affine else x4.new_zeros(1, C, 1, 1)
    y = spade_norm(
        x4,
        gamma,
        beta,
        norm="batch",
        eps=bn.eps,
        running_mean=bn.running_mean,
        running_var=bn.running_var,
        training=training,
        momentum=momentum if momentum is not None else 0.0,
        process_group=process_group if training else None,
        backend=backend,
    )
    return y.view(x.shape)
