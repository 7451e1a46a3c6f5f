"""FusedOp: a ``torch.library`` custom op with an eager fast path.

Every fused op registers its kernel-level functions as custom ops (what torch.compile, export,
opcheck, fake tensors and every mode or transform see). In plain eager mode those layers
(argument binding, redispatch, a generated autograd Function) cost more than a small kernel:
measured on a 2-core CPU, about half of a tiny compositing call (12 -> 6 us) and a third of its
forward+backward. So a :class:`FusedOp` call checks whether anything could tell the difference and,
if nothing could, calls the implementation directly (no autograd to record) or through an
``autograd.Function`` with the same ``setup_context`` and ``backward``. tests/test_op_contract.py
checks that both paths give bit-identical outputs and gradients.
"""

import inspect

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)  # tensor types that dispatch no differently from Tensor

# custom op overload -> the same computation in standard PyTorch ops (see FusedOp.register_decomposition)
_DECOMPOSITIONS: dict = {}


def decompositions() -> dict:
    """Every fused op's forward as standard PyTorch ops, for ``ExportedProgram.run_decompositions``:

    >>> ep = torch.export.export(model, args)  # fnevr::grid_sample, fnevr::composite... inside
    >>> ep = ep.run_decompositions(fnevr.ops.decompositions())  # aten.grid_sampler, cumsum... instead

    (``fnevr.export.export_onnx`` does this.) Backward ops have none: export is for inference."""
    return dict(_DECOMPOSITIONS)


def _plain_eager(tensors) -> bool:
    """Whether calling an op's implementation directly is indistinguishable from calling its custom
    op: not traced (torch.compile, export), no torch.func transform, no torch function or dispatch
    mode (FakeTensorMode, profilers of ops), no tensor subclass (FakeTensor, DTensor)."""
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    return all(type(t) in _PLAIN for t in tensors)


class FusedOp:
    """The custom op ``name`` (``.op``) over `fn`, callable with the eager fast path. Positional
    arguments only, tensors (and ``list[Tensor]``) first. With a tensor list and autograd to record,
    the custom op runs: an ``autograd.Function`` would not see the tensors inside a list."""

    def __init__(self, name: str, fn):
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self.register_fake = self.op.register_fake
        self.name, self._impl, self._function = name, fn, None
        kinds = [p.annotation for p in inspect.signature(fn).parameters.values()]
        self._tensors = next((i for i, k in enumerate(kinds) if k not in (Tensor, list[Tensor])), len(kinds))
        self._lists = list[Tensor] in kinds[: self._tensors]

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self._impl

        def forward(ctx, *args):  # ctx first: with a separate setup_context, each apply() would
            out = impl(*args)  # bind its arguments with inspect.signature (~15 us)
            setup_context(ctx, args, out)
            return out

        # The custom op's own autograd Function has this name: grad_fn reads the same either way.
        name = "GeneratedBackwardFor_" + self.name.replace("::", "_") + "_default"
        self._function = type(
            name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        )

    def register_decomposition(self, fn):
        """``fn``, with the op's arguments, computes the op's outputs in standard PyTorch ops (each
        with an ONNX equivalent). ``ExportedProgram.run_decompositions(fnevr.ops.decompositions())``
        puts it in place of the op, so that a graph leaves PyTorch without fnevr's kernels."""
        _DECOMPOSITIONS[self.op._opoverload] = fn
        return fn

    def __call__(self, *args):
        tensors = args[: self._tensors]
        if self._lists:
            tensors = [t for a in tensors for t in (a if isinstance(a, (list, tuple)) else (a,))]
        if not _plain_eager(tensors):
            return self.op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            # without an autograd formula, the custom op raises its own error in backward
            return self.op(*args) if self._function is None or self._lists else self._function.apply(*args)
        return self._impl(*args)


def custom_op(name: str):
    """``@custom_op("fnevr::name")``: a :class:`FusedOp` (no mutated arguments) for the decorated function."""
    return lambda fn: FusedOp(name, fn)
