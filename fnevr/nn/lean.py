"""Ops that keep less for backward than their PyTorch equivalents, with the same gradients.

Used by the frozen networks of the losses (VGG19) when :func:`fnevr.nn.recompute.saving_memory`
is on; outside it each is the plain PyTorch op.

* :func:`frozen_conv2d`: a convolution whose weight needs no gradient keeps only that weight (the
  input is needed for the weight's gradient alone, which PyTorch keeps anyway);
* :func:`relu`: keeps a one-byte mask, not the output;
* :func:`max_pool2x2`: keeps which of the four inputs won (one byte per output), not the input or
  int64 indices;
* :func:`l1_mean`: ``mean |a - b|`` (``b`` a target) keeps the one-byte sign of ``a - b``.

NaN and inf give the gradients PyTorch's ops give.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import recompute


class _FrozenConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dtype):
        ctx.shape, ctx.padding, ctx.dtype = x.shape, padding, dtype
        ctx.save_for_backward(weight)  # a parameter: kept anyway; cast again in backward
        return F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype), padding=padding)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dx = torch.nn.grad.conv2d_input(ctx.shape, weight.to(ctx.dtype), grad, padding=ctx.padding)
        return dx, None, None, None, None


def frozen_conv2d(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    """``conv(x)`` for a stride-1 ``Conv2d`` whose parameters need no gradient."""
    frozen = not (conv.weight.requires_grad or (conv.bias is not None and conv.bias.requires_grad))
    if not (
        recompute.active()
        and frozen
        and x.requires_grad
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and isinstance(conv.padding, tuple)
    ):
        return conv(x)
    dtype = recompute.autocast_dtype(x) or x.dtype  # autocast runs convolutions in its dtype
    with torch.autocast(x.device.type, enabled=False):
        return _FrozenConv2d.apply(x.to(dtype), conv.weight, conv.bias, conv.padding, dtype)


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.relu(x)
        ctx.save_for_backward(~(out <= 0))  # PyTorch's backward passes the gradient where not (out <= 0)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask


def relu(x: Tensor) -> Tensor:
    """``torch.relu(x)``; keeps a bool mask instead of the output inside ``saving_memory``."""
    return _ReLU.apply(x) if recompute.active() and x.requires_grad else torch.relu(x)


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, index = F.max_pool2d(x, 2, 2, return_indices=True)
        width = x.shape[-1]
        ctx.size = x.shape[-2:]
        ctx.save_for_backward(((index // width % 2) * 2 + index % 2).to(torch.int8))
        return out

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        h, w = code.shape[-2:]
        rows = torch.arange(h, device=code.device).view(h, 1) * 2 + (code // 2).long()
        cols = torch.arange(w, device=code.device) * 2 + (code % 2).long()
        return F.max_unpool2d(grad, rows * ctx.size[1] + cols, 2, 2, output_size=ctx.size)


def max_pool2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2, 2)`` on ``[N, C, H, W]``; keeps an int8 per output inside ``saving_memory``."""
    if recompute.active() and x.requires_grad and x.dim() == 4:
        return _MaxPool2x2.apply(x)
    return F.max_pool2d(x, 2, 2)


class _L1Mean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, out_dtype):
        d = a - b
        ctx.numel, ctx.dtype = d.numel(), d.dtype
        sign = torch.sign(d)
        ctx.save_for_backward(torch.where(torch.isnan(sign), 2, sign).to(torch.int8))  # 2 codes NaN
        return d.abs().to(out_dtype).mean()

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        sign = torch.where(code == 2, float("nan"), code.to(ctx.dtype)).to(ctx.dtype)
        # as autograd: mean -> cast to the difference's dtype -> abs (grad * sgn)
        return (grad.expand(code.shape) / ctx.numel).to(ctx.dtype) * sign, None, None


def l1_mean(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a - b).abs().to(out_dtype).mean()`` with no gradient for ``b``."""
    b = b.detach()
    if not (recompute.active() and a.requires_grad):
        return (a - b).abs().to(out_dtype).mean()
    dtype = torch.promote_types(a.dtype, b.dtype)
    return _L1Mean.apply(a.to(dtype), b.to(dtype), out_dtype)
