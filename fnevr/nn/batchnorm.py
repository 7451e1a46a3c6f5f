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
        N, C = x.shape[:2]
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        training = self.training or self.running_mean is None
        group = self.process_group
        if group is None and training and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        x4 = x if x.dim() == 4 else x.reshape(N, C, -1, 1)
        # (under autocast x may be bf16 while the parameters stay fp32)
        gamma = (self.weight - 1).view(1, C, 1, 1).to(x.dtype) if self.affine else x4.new_zeros(1, C, 1, 1)
        beta = self.bias.view(1, C, 1, 1).to(x.dtype) if self.affine else x4.new_zeros(1, C, 1, 1)
        y = spade_norm(
            x4,
            gamma,
            beta,
            norm="batch",
            eps=self.eps,
            running_mean=self.running_mean,
            running_var=self.running_var,
            training=training,
            momentum=momentum if momentum is not None else 0.0,
            process_group=group if training else None,
            backend=self.ops_backend,
        )
        return y.view(x.shape)

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
