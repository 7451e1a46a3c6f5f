r"""SPADE normalisation: a parameter-free norm of ``x``, modulated per pixel and activated.

.. math::

    \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    y = \mathrm{act}\big(\hat x \, (1 + \gamma) + \beta\big)

with :math:`\mu, \sigma^2` (biased) per (sample, channel) over H, W for ``norm="instance"``
(``InstanceNorm2d(affine=False)``), or per channel over N, H, W for ``norm="batch"``
(``BatchNorm2d(affine=False)``: running statistics are updated in training and used in eval; with a
``process_group`` the statistics are reduced across its processes, as ``SyncBatchNorm`` does).
``act`` is ``None``, ``"relu"`` or ``"leaky_relu"``.

Shapes: ``x`` ``[N, C, H, W]`` (FNeVR's decoder: ``[B, 512, 64, 64]``, ``[B, 128, 128, 128]``,
``[B, 32, 256, 256]``), NCHW or channels_last; ``gamma`` and ``beta`` ``[N, C, H, W]`` or anything
that broadcasts to it (``[N, C, 1, 1]`` for AdaIN-style modulation); ``y`` like ``x``, in its memory
format. Gradients flow to ``x``, ``gamma`` and ``beta``. The fused backends keep fp32 statistics
(fp64 for fp64), save only the inputs and the per-group mean and variance for backward, and
recompute :math:`\hat x` there. Example::

    >>> import torch, fnevr
    >>> x = torch.randn(2, 32, 64, 64, requires_grad=True)
    >>> gamma, beta = torch.randn(2, 2, 32, 64, 64).unbind(0)
    >>> y = fnevr.ops.spade_norm(x, gamma, beta, activation="relu")
    >>> y.shape
    torch.Size([2, 32, 64, 64])
    >>> y.sum().backward()

Backends: ``reference`` (:func:`spade_norm_reference`, the spec, plain autograd), ``cpu``
(csrc/spade_norm/spade_norm_cpu.cpp), ``cuda`` (csrc/spade_norm/spade_norm_cuda.cu), ``triton``
(kernels/spade_norm.py); ``auto`` picks the fastest one available for the tensors' device.

Kernel passes: a statistics pass, then an element-wise pass; backward, a pass for the per-group sums
of ``dxhat`` and ``dxhat * xhat`` (skipped in eval-mode batch norm), then one for the gradients.
Triton fuses each direction into one kernel for NCHW instance norm (FNeVR's case). Batch norm with a
``process_group`` all-reduces the statistics and the backward sums with ``torch.distributed``
between the passes (eager mode only).
"""

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _registry
from ._codes import Activation
from ._fused import custom_op
from ._layout import is_channels_last

NORMS = ("instance", "batch")
# Names -> kernel codes (plain ints: what the schemas take)
ACTIVATIONS = {None: int(Activation.NONE), "relu": int(Activation.RELU), "leaky_relu": int(Activation.LEAKY_RELU)}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def spade_norm_reference(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    *,
    norm: str = "instance",
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.2,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    process_group=None,
) -> Tensor:
    """The spec: PyTorch's own norms and arithmetic, differentiated by autograd. Same arguments as
    :func:`spade_norm` (unchecked)."""
    if norm == "instance" and x.shape[2] * x.shape[3] == 1:  # F.instance_norm refuses one pixel: it is 0
        xhat = x - x.mean((2, 3), keepdim=True)
    elif norm == "instance":
        xhat = F.instance_norm(x, eps=eps)
    elif process_group is None or not training:
        xhat = F.batch_norm(x, running_mean, running_var, training=training, momentum=momentum, eps=eps)
    else:
        xhat = _sync_batch_norm_reference(x, eps, running_mean, running_var, momentum, process_group)
    z = xhat * (1 + gamma) + beta
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    return z


def _sync_batch_norm_reference(x, eps, running_mean, running_var, momentum, group):
    """Training batch norm over every process of `group`, through autograd-aware all-reduces."""
    from torch.distributed.nn.functional import all_reduce

    count = all_reduce(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device), group=group)
    mean = all_reduce(x.sum((0, 2, 3)), group=group) / count
    centred = x - mean[None, :, None, None]
    var = all_reduce(centred.square().sum((0, 2, 3)), group=group) / count
    if running_mean is not None:
        _update_running(running_mean, running_var, mean.detach(), var.detach(), count.item(), momentum)
    return centred * torch.rsqrt(var + eps)[None, :, None, None]


def spade_norm(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    *,
    norm: str = "instance",
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.2,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    process_group=None,
    backend: str = "auto",
) -> Tensor:
    """``act(norm(x) * (1 + gamma) + beta)`` for ``x`` ``[N, C, H, W]``.

    Args:
        x: features, float16/bfloat16/float32/float64, NCHW or channels_last.
        gamma, beta: modulation, same dtype and device as ``x``, broadcastable to its shape.
        norm: ``"instance"`` (per sample and channel) or ``"batch"`` (per channel).
        eps: added to the variance.
        activation: ``None``, ``"relu"`` or ``"leaky_relu"`` (with ``negative_slope``).
        running_mean, running_var: ``[C]`` batch-norm running statistics (``norm="batch"`` only):
            updated in place when ``training``, used instead of the batch's when not.
        training: batch norm only: normalise with this batch's statistics (and update the running ones).
        momentum: weight of the batch's statistics in the running ones.
        process_group: batch norm in training only: a ``torch.distributed`` group whose processes'
            batches are normalised together (``SyncBatchNorm``); ``None`` normalises locally.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``[N, C, H, W]`` in ``x``'s dtype and memory format.
    """
    _check(x, gamma, beta, norm, activation, running_mean, running_var, training, momentum)
    _check_numbers(eps, negative_slope)
    if process_group is not None and norm != "batch":
        raise ValueError("process_group applies to norm='batch' only")
    name = _registry.resolve(backend, x.device, "spade_norm")
    kw = dict(
        norm=norm,
        eps=eps,
        activation=activation,
        negative_slope=negative_slope,
        running_mean=running_mean,
        running_var=running_var,
        training=training,
        momentum=momentum,
        process_group=process_group,
    )
    if name == "reference":
        return spade_norm_reference(x, gamma, beta, **kw)
    batch = norm == "batch"
    cl = is_channels_last(x)
    x3, g, b = _flat(x, cl), _modulation(gamma, x, cl), _modulation(beta, x, cl)
    opts = (float(eps), cl, ACTIVATIONS[activation], float(negative_slope))
    if name in _FUSED_INSTANCE and not batch and not cl:  # statistics and output in one pass
        y3, _, _ = _spade_norm_instance_op(x3, g, b, opts[0], opts[2], opts[3], name)
        return _unflat(y3, x, cl)
    if batch and training and process_group is not None:
        y3 = _SyncSpadeNorm.apply(x3, g, b, opts, name, process_group, running_mean, running_var, momentum)
        return _unflat(y3, x, cl)
    if batch and not training:
        assert running_mean is not None and running_var is not None  # _check's
        acc = _acc(x.dtype)
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
    else:
        mean, var = _spade_norm_stats_op(x3.detach(), cl, batch, name)
        if batch and running_mean is not None:
            _update_running(running_mean, running_var, mean, var, x3.numel() // x.shape[1], momentum)
    y3 = _spade_norm_op(x3, g, b, mean, var, *opts, not batch or training, name)
    return _unflat(y3, x, cl)


def _update_running(running_mean, running_var, mean, var, count, momentum):
    if count < 2:  # an empty batch has no statistics to fold in
        return
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_((momentum * count / (count - 1)) * var.to(running_var.dtype))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- layouts: the kernels see x as a contiguous [N, C, S] (NCHW) or [N, S, C] (channels_last) ------


def _flat(t, cl):
    N, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(N, H * W, C) if cl else t.contiguous().view(N, C, H * W)


def _unflat(t3, x, cl):
    N, C, H, W = x.shape
    return t3.view(N, H, W, C).permute(0, 3, 1, 2) if cl else t3.view(N, C, H, W)


def _modulation(t, x, cl):
    """gamma or beta for the kernels: per (sample, channel) ``[N, C]`` when it is constant over H, W,
    else full size in x's layout. Broadcasting is done here, so autograd sums its gradient back."""
    N, C, H, W = x.shape
    if t.shape != x.shape or H * W == 1:  # a full-size t, the common case, needs no views (~4 us)
        t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        if t4.shape[2] == 1 and t4.shape[3] == 1:
            return t4.expand(N, C, 1, 1).reshape(N, C).contiguous()
        t = t4.expand(x.shape)
    if cl:
        return t.permute(0, 2, 3, 1).contiguous().view(N, H * W, C)
    return t.contiguous().view(N, C, H * W)


def check_eps(eps, who: str = "spade_norm") -> None:
    """eps must be a finite number >= 0 (0 as PyTorch's norms allow): a negative one makes var + eps
    negative for near-constant groups, NaN that would look like bad data, not a bad argument."""
    if not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{who}: eps must be a finite number >= 0, got {eps!r}")


def _check_numbers(eps, negative_slope):
    check_eps(eps)
    # A NaN slope makes every negative z NaN, an infinite one makes them +-inf (or NaN at -0).
    if not isinstance(negative_slope, numbers.Real) or not math.isfinite(negative_slope):
        raise ValueError(f"spade_norm: negative_slope must be a finite number, got {negative_slope!r}")


def _check(x, gamma, beta, norm, activation, running_mean, running_var, training, momentum):
    for arg, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    shape = x.shape  # each .shape is a new torch.Size: read it once
    if len(shape) != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(shape)}")
    for arg, t in (("gamma", gamma), ("beta", beta)):
        if not _broadcasts_to(t.shape, shape):
            raise ValueError(
                f"{arg} must be [N, C, H, W] = {list(shape)} or broadcastable to it "
                f"(e.g. [N, C, 1, 1]), got shape {tuple(t.shape)}"
            )
        if t.dtype != x.dtype:
            raise ValueError(f"{arg} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{arg} must be on x's device {x.device}, got {t.device}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if norm == "instance" and running_mean is not None:
        raise ValueError("running_mean/running_var apply to norm='batch' only")
    if norm == "batch" and not training and running_mean is None:
        raise ValueError("norm='batch' with training=False needs running_mean and running_var")
    C = shape[1]
    for arg, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (
            not isinstance(t, Tensor) or t.shape != (C,) or not t.is_floating_point() or t.device != x.device
        ):
            got = f"shape {tuple(t.shape)}, {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{arg} must be a floating [C] = [{C}] tensor on {x.device}, got {got}")
    if norm == "batch" and training:
        if x.numel() // max(C, 1) <= 1 and x.numel() > 0:
            raise ValueError(
                f"norm='batch' in training needs more than one value per channel, got shape {tuple(shape)}"
            )
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def _broadcasts_to(shape, target) -> bool:
    """Whether `shape` broadcasts to `target` itself (torch.broadcast_shapes costs ~10 us a call)."""
    pad = len(target) - len(shape)
    return shape == target or (pad >= 0 and all(s == 1 or s == t for s, t in zip(shape, target[pad:])))


# --- kernels ---------------------------------------------------------------------------------------

_FUSED_INSTANCE = ("cpu", "triton")  # backends with the one-pass NCHW instance-norm kernels


def _kernels(backend):
    return _registry.kernels(backend, "spade_norm")


def _backward_impl(
    backend,
    grad_y,
    x3,
    g,
    b,
    mean,
    var,
    eps,
    cl,
    act,
    slope,
    stats_grad,
    gamma_grad,
    beta_grad,
    all_reduce=None,
    count=None,
):
    """(dx, dgamma, dbeta) for the kernel-level tensors; `all_reduce` sums [2, C] across processes."""
    k = _kernels(backend)
    batch = mean.dim() == 1
    if backend in _FUSED_INSTANCE and not batch and not cl:  # one fused kernel
        return k.spade_norm_instance_backward(grad_y, x3, g, b, mean, var, eps, act, slope, gamma_grad, beta_grad)
    need_sums = stats_grad or (g.dim() == 2 and gamma_grad) or (b.dim() == 2 and beta_grad)
    sums = (
        k.spade_norm_backward_reduce(grad_y, x3, g, b, mean, var, eps, cl, act, slope) if need_sums else None
    )  # [4, N, C]
    scale = 0.0
    if stats_grad:
        group_sums = sums[:2].sum(1) if batch else sums[:2]
        if all_reduce is not None:
            all_reduce(group_sums)
        count = count if count is not None else x3.numel() // max(mean.numel(), 1)
        scale = 1.0 / count if count else 0.0
    else:
        group_sums = torch.zeros((2,) + tuple(mean.shape), dtype=mean.dtype, device=mean.device)
    dx, dg, db = k.spade_norm_backward(
        grad_y,
        x3,
        g,
        b,
        mean,
        var,
        group_sums,
        scale,
        eps,
        cl,
        act,
        slope,
        gamma_grad and g.dim() == 3,
        beta_grad and b.dim() == 3,
    )
    if g.dim() == 2 and gamma_grad:
        dg = sums[3].to(g.dtype, copy=True)
    if b.dim() == 2 and beta_grad:
        db = sums[2].to(b.dtype, copy=True)
    return dx, dg, db


# --- torch.library registration ------------------------------------------------------------------


@custom_op("fnevr::spade_norm_stats")
def _spade_norm_stats_op(x: Tensor, channels_last: bool, batch: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).spade_norm_stats(x, channels_last, batch)


@_spade_norm_stats_op.register_fake
def _(x, channels_last, batch, backend):
    C = x.shape[2] if channels_last else x.shape[1]
    shape = (C,) if batch else (x.shape[0], C)
    return x.new_empty(shape, dtype=_acc(x.dtype)), x.new_empty(shape, dtype=_acc(x.dtype))


@custom_op("fnevr::spade_norm")
def _spade_norm_op(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    channels_last: bool,
    activation: int,
    negative_slope: float,
    stats_grad: bool,
    backend: str,
) -> Tensor:
    return _kernels(backend).spade_norm_forward(
        x, gamma, beta, mean, var, eps, channels_last, activation, negative_slope
    )


@_spade_norm_op.register_fake
def _(x, gamma, beta, mean, var, eps, channels_last, activation, negative_slope, stats_grad, backend):
    return torch.empty_like(x)


@custom_op("fnevr::spade_norm_grad")
def _spade_norm_grad_op(
    grad_y: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    channels_last: bool,
    activation: int,
    negative_slope: float,
    stats_grad: bool,
    backend: str,
    gamma_grad: bool,
    beta_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dg, db = _backward_impl(
        backend,
        grad_y,
        x,
        gamma,
        beta,
        mean,
        var,
        eps,
        channels_last,
        activation,
        negative_slope,
        stats_grad,
        gamma_grad,
        beta_grad,
    )
    return dx, dg if gamma_grad else x.new_empty((0,)), db if beta_grad else x.new_empty((0,))


@_spade_norm_grad_op.register_fake
def _(
    grad_y,
    x,
    gamma,
    beta,
    mean,
    var,
    eps,
    channels_last,
    activation,
    negative_slope,
    stats_grad,
    backend,
    gamma_grad,
    beta_grad,
):
    return (
        torch.empty_like(x),
        torch.empty_like(gamma) if gamma_grad else x.new_empty((0,)),
        torch.empty_like(beta) if beta_grad else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, gamma, beta, mean, var, *options = inputs
    ctx.save_for_backward(x, gamma, beta, mean, var)
    ctx.options = tuple(options)


def _backward(ctx, grad_y):
    x, gamma, beta, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dg, db = _spade_norm_grad_op(grad_y.contiguous(), x, gamma, beta, mean, var, *ctx.options, need[1], need[2])
    return dx, (dg if need[1] else None), (db if need[2] else None), None, None, None, None, None, None, None, None


_spade_norm_op.register_autograd(_backward, setup_context=_setup_context)


@custom_op("fnevr::spade_norm_instance")
def _spade_norm_instance_op(
    x: Tensor, gamma: Tensor, beta: Tensor, eps: float, activation: int, negative_slope: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Instance norm of an NCHW [N, C, S] x in one pass -> (y, mean, var)."""
    return _kernels(backend).spade_norm_instance_forward(x, gamma, beta, eps, activation, negative_slope)


@_spade_norm_instance_op.register_fake
def _(x, gamma, beta, eps, activation, negative_slope, backend):
    stats = lambda: x.new_empty(x.shape[:2], dtype=_acc(x.dtype))
    return torch.empty_like(x), stats(), stats()


def _instance_setup_context(ctx, inputs, output):
    x, gamma, beta, eps, activation, negative_slope, backend = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, gamma, beta, mean, var)
    ctx.options = (eps, False, activation, negative_slope, True, backend)


def _instance_backward(ctx, grad_y, _grad_mean, _grad_var):
    return _backward(ctx, grad_y)[:3] + (None,) * 4


_spade_norm_instance_op.register_autograd(_instance_backward, setup_context=_instance_setup_context)


# --- decompositions: the kernel-level ops in standard PyTorch ops (for export; see FusedOp) -------


def _activate(z, activation, negative_slope):
    if activation == ACTIVATIONS["relu"]:
        return torch.relu(z)
    if activation == ACTIVATIONS["leaky_relu"]:
        return F.leaky_relu(z, negative_slope)
    return z


def _per_channel(t, x3, cl):
    """A [N, C] or [C] tensor shaped to broadcast against x3 ([N, C, S] or, channels_last, [N, S, C])."""
    if t.dim() == 3:
        return t
    t = t if t.dim() == 2 else t[None]
    return t[:, None, :] if cl else t[:, :, None]


def _stats(x3, channels_last, batch):
    dims = ((0,) if batch else ()) + ((1,) if channels_last else (2,))
    var, mean = torch.var_mean(x3.to(_acc(x3.dtype)), dim=dims, correction=0)
    return mean, var


_spade_norm_stats_op.register_decomposition(lambda x, channels_last, batch, backend: _stats(x, channels_last, batch))


@_spade_norm_op.register_decomposition
def _(x, gamma, beta, mean, var, eps, channels_last, activation, negative_slope, stats_grad, backend):
    acc = _acc(x.dtype)
    xhat = (x.to(acc) - _per_channel(mean, x, channels_last)) * _per_channel(torch.rsqrt(var + eps), x, channels_last)
    g, b = (_per_channel(t, x, channels_last).to(acc) for t in (gamma, beta))
    return _activate(xhat * (1 + g) + b, activation, negative_slope).to(x.dtype)


@_spade_norm_instance_op.register_decomposition
def _(x, gamma, beta, eps, activation, negative_slope, backend):  # ONNX's InstanceNormalization + modulation
    acc = _acc(x.dtype)
    g, b = (_per_channel(t, x, False).to(acc) for t in (gamma, beta))
    xhat = F.instance_norm(x.to(acc), eps=eps) if x.shape[2] > 1 else x.to(acc) - x.to(acc).mean(2, keepdim=True)
    y = _activate(xhat * (1 + g) + b, activation, negative_slope)
    return (y.to(x.dtype), *_stats(x, False, False))


class _SyncSpadeNorm(torch.autograd.Function):
    """Training batch norm across a process group: local statistics merged with all-reduces
    (torch.distributed), in eager mode; the kernels are the same as the local path's."""

    @staticmethod
    def forward(ctx, x3, g, b, opts, backend, group, running_mean, running_var, momentum):
        import torch.distributed as dist

        k = _kernels(backend)
        cl = opts[1]
        mean_l, var_l = k.spade_norm_stats(x3, cl, True)
        n_l = x3.numel() // mean_l.numel()
        # Exact merge (Chan): global mean from the sums, then every process's M2 moved to it.
        packed = torch.cat([mean_l * n_l, mean_l.new_full((1,), n_l)])
        dist.all_reduce(packed, group=group)
        count = packed[-1].item()
        mean = packed[:-1] / count
        m2 = var_l * n_l + n_l * (mean_l - mean).square()
        dist.all_reduce(m2, group=group)
        var = m2 / count
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, momentum)
        ctx.save_for_backward(x3, g, b, mean, var)
        ctx.opts, ctx.backend, ctx.group, ctx.count = opts, backend, group, count
        return k.spade_norm_forward(x3, g, b, mean, var, *opts)

    @staticmethod
    def backward(ctx, grad_y):
        import torch.distributed as dist

        x3, g, b, mean, var = ctx.saved_tensors
        dx, dg, db = _backward_impl(
            ctx.backend,
            grad_y.contiguous(),
            x3,
            g,
            b,
            mean,
            var,
            *ctx.opts,
            True,
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[2],
            all_reduce=lambda t: dist.all_reduce(t, group=ctx.group),
            count=ctx.count,
        )
        return dx, (dg if ctx.needs_input_grad[1] else None), (db if ctx.needs_input_grad[2] else None), *[None] * 6


def _samples(device, dtype, generator) -> list[_registry.Sample]:
    """The first is bench_overhead's tiny call ([1, 4, 8, 8], full-size modulation, ReLU)."""
    tiny = tuple(_registry.tensors([(1, 4, 8, 8)] * 3, device, dtype, generator))
    x, gamma, beta = _registry.tensors([(2, 3, 4, 5), (2, 3, 4, 5), (2, 3, 1, 1)], device, dtype, generator)
    stats = dict(
        running_mean=torch.zeros(3, dtype=dtype, device=device), running_var=torch.ones(3, dtype=dtype, device=device)
    )
    args = (x, gamma, beta)
    saved = x.numel() + gamma.numel() + beta.numel() + 2 * 2 * 3  # inputs, and mean and var per group
    return [
        _registry.Sample("instance-relu", tiny, dict(activation="relu"), (0, 1, 2), 3 * 4 * 64 + 2 * 4),
        _registry.Sample("instance-leaky", args, dict(activation="leaky_relu"), (0, 1, 2), saved),
        _registry.Sample("batch-relu", args, dict(norm="batch", activation="relu", **stats), (0, 2), saved),
        _registry.Sample("batch-eval", args, dict(norm="batch", training=False, **stats), (1,), saved),
    ]


OP = _registry.register(
    _registry.Op(
        name="spade_norm",
        fn=spade_norm,
        reference=spade_norm_reference,
        samples=_samples,
        auto={"cpu": _registry.CPU_ORDER, "cuda": ("triton", "cuda")},
        why_auto="CUDA: not yet timed on a GPU; Triton until it is",
        layouts=True,
    )
)
