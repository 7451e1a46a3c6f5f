r"""Recompute cheap tensors in backward instead of keeping them: the training-memory saver.

Autograd keeps, until backward, every tensor an op needs for its gradient. In a conv-norm-ReLU
network most of those are outputs of cheap ops (normalisation, activation, pooling, upsampling,
concatenation) that the next convolution keeps as its input, while the tensor they were computed
from is kept anyway. Inside :func:`saving_memory`:

* :func:`recomputed` runs a cheap function so that only its inputs are kept; backward recomputes
  it (with autocast as in forward) and differentiates that;
* its output, and any tensor passed through :func:`cheap`, is *recomputable*: when a later op saves
  it for backward, autograd keeps a recipe (the function and its inputs) instead, and backward
  rebuilds the tensor from it. Recipes nest, so a chain of cheap ops costs nothing but its anchor.

Outside :func:`saving_memory` both helpers are plain calls, so the model computes exactly what it
computes without them. The recomputed tensors are bitwise equal to the forward ones (the same
kernels on the same inputs), so gradients are unchanged. Functions must be pure: side effects such
as BatchNorm's running statistics go in ``run`` (called once, in forward), the pure twin in ``pure``.

    >>> import torch
    >>> from fnevr.nn import recompute
    >>> x = torch.randn(8, 16, requires_grad=True)
    >>> w = torch.randn(16, 16, requires_grad=True)
    >>> with recompute.saving_memory():
    ...     y = recompute.recomputed(torch.relu, x)   # keeps x, not relu(x)
    ...     loss = (y @ w).sum()                       # keeps a recipe for y, not y
    >>> loss.backward()
"""

import contextlib
import threading

import torch
from torch import Tensor

_state = threading.local()


def active() -> bool:
    """Inside :func:`saving_memory`, with grad enabled and not being traced by ``torch.compile``
    (which does its own recomputation)."""
    return inside() and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def inside() -> bool:
    """Inside :func:`saving_memory` (pack hooks run with grad off, so they ask this, not :func:`active`)."""
    return getattr(_state, "depth", 0) > 0


def checkpointing() -> bool:
    """Inside ``saving_memory(checkpoint=True)``: whole blocks (convolutions too) are recomputed."""
    return active() and getattr(_state, "checkpoint", False)


def recomputing() -> bool:
    """While backward recomputes a :func:`recomputed` function (side effects must be skipped)."""
    return getattr(_state, "recomputing", 0) > 0


class _Recipe:
    """``fn(*args)``, where each arg is a tensor (kept), a recipe (rebuilt) or a constant."""

    __slots__ = ("args", "autocast", "fn", "versions")

    def __init__(self, fn, args, autocast, versions=None):
        self.fn, self.args, self.autocast = fn, args, autocast
        self.versions = versions if versions is not None else _versions(args)

    def intact(self) -> bool:
        return self.versions == _versions(self.args)

    def build(self) -> Tensor:
        if not self.intact():
            raise RuntimeError(
                "fnevr.nn.recompute: a tensor needed to recompute a saved activation was modified "
                "in place after the forward pass"
            )
        args = [a.build() if isinstance(a, _Recipe) else a for a in self.args]
        with torch.no_grad(), _autocast(self.autocast):
            return self.fn(*args)

    def anchors(self):
        """The tensors this recipe keeps alive."""
        for a in self.args:
            if isinstance(a, _Recipe):
                yield from a.anchors()
            elif isinstance(a, Tensor):
                yield a


def autocast_dtype(x: Tensor):
    """The dtype autocast computes in on ``x``'s device, or ``None`` when it is off there."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) else None


def _versions(args):
    return [a._version if isinstance(a, Tensor) else None for a in args]


def _autocast_state():
    return [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]


def _autocast(state):
    stack = contextlib.ExitStack()
    for d in ("cpu", "cuda"):
        dtype = dict(state).get(d)
        stack.enter_context(torch.autocast(d, dtype=dtype, enabled=dtype is not None))
    return stack


def _as_recipe(t):
    """The recipe of a recomputable tensor still in the state it was made in, else ``None``."""
    if not isinstance(t, Tensor):
        return None
    tag = getattr(t, "_fnevr_recipe", None)
    if tag is None or tag[0] != t._version or not tag[1].intact():
        return None
    args = [_as_recipe(a) or a for a in tag[1].args]
    return _Recipe(tag[1].fn, args, tag[1].autocast)


def cheap(out: Tensor, fn, *args) -> Tensor:
    """Mark ``out`` (which ``fn(*args)`` made, with no side effects) as recomputable; returns it."""
    if active() and isinstance(out, Tensor):
        out._fnevr_recipe = (out._version, _Recipe(fn, args, _autocast_state()))
    return out


def cheap_call(fn, *args) -> Tensor:
    """``fn(*args)``, marked recomputable (:func:`cheap`)."""
    return cheap(fn(*args), fn, *args)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, pure, *args):
        ctx.pure, ctx.autocast = pure, _autocast_state()
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.args = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_at))
        return run(*args)

    @staticmethod
    def backward(ctx, grad):
        args = list(ctx.args)
        wanted = []
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(ctx.needs_input_grad[2 + i])
            if ctx.needs_input_grad[2 + i]:
                wanted.append(i)
        _state.recomputing = getattr(_state, "recomputing", 0) + 1
        try:
            with torch.enable_grad(), _autocast(ctx.autocast):
                out = ctx.pure(*args)
        finally:
            _state.recomputing -= 1
        grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True) if wanted else ()
        result = [None] * len(args)
        for i, g in zip(wanted, grads):
            result[i] = g
        return None, None, *result


def recomputed(run, *args, pure=None, mark: bool = True) -> Tensor:
    """``run(*args)``, keeping only ``args`` for backward (where ``pure``, default ``run``, is
    recomputed and differentiated); with ``mark`` the output is recomputable (:func:`cheap`). A
    plain call outside :func:`saving_memory`."""
    if not active():
        return run(*args)
    pure = pure or run
    out = _Recomputed.apply(run, pure, *args)
    return cheap(out, pure, *args) if mark else out


def checkpoint_module(module: torch.nn.Module, *inputs: Tensor) -> Tensor:
    """``module(*inputs)`` keeping only the inputs: backward runs the module again (its parameters
    passed as inputs, so their gradients flow as any other). Its output is kept, not rebuilt."""
    params = dict(module.named_parameters())
    k = len(inputs)

    def pure(*args):
        return torch.func.functional_call(module, dict(zip(params, args[k:])), args[:k])

    return recomputed(lambda *args: module(*args[:k]), *inputs, *params.values(), pure=pure, mark=False)


def _weight_cast(t):
    """The recipe of an autocast copy of a parameter (it is cast again in backward), else ``None``."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    source = getattr(fn.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf
    if source is None or source.shape != t.shape or source.dtype == t.dtype:
        return None
    return _Recipe(_cast_like, [source, t.dtype, _format(t)], [])


def _format(t):
    return (
        torch.channels_last
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        else torch.contiguous_format
    )


def _cast_like(source, dtype, memory_format):
    return source.to(dtype).contiguous(memory_format=memory_format)


def pack(t):
    """The saved-tensor pack hook of :func:`saving_memory` (for hooks of one's own that wrap it)."""
    packed = _as_recipe(t) or _weight_cast(t) or t
    for observe in getattr(_state, "observers", ()):
        observe(packed)
    return packed


def unpack(packed):
    return packed.build() if isinstance(packed, _Recipe) else packed


def anchors(packed):
    """The tensors a packed saved tensor keeps alive (for memory accounting)."""
    return list(packed.anchors()) if isinstance(packed, _Recipe) else [packed]


@contextlib.contextmanager
def saving_memory(enabled: bool = True, checkpoint: bool = False):
    """Within it (in forward), the helpers above keep recipes instead of cheap tensors. With
    ``checkpoint``, the blocks that ask :func:`checkpointing` keep only their inputs and run again
    in backward (activation checkpointing: less memory, more time). Run the backward after it
    closes or inside it: either works."""
    if not enabled:
        yield
        return
    saved = getattr(_state, "checkpoint", False)
    _state.depth, _state.checkpoint = getattr(_state, "depth", 0) + 1, checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _state.depth, _state.checkpoint = _state.depth - 1, saved


@contextlib.contextmanager
def observe(callback):
    """Call ``callback(packed)`` for every tensor packed inside :func:`saving_memory` (a tensor or
    a recipe; see :func:`anchors`)."""
    observers = getattr(_state, "observers", [])
    _state.observers = observers + [callback]
    try:
        yield
    finally:
        _state.observers = observers
