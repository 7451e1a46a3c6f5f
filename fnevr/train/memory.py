"""Where a training step's memory goes: the bytes autograd saves for backward, per module.

:class:`SavedTensorLedger` records every tensor autograd saves while it is active and charges it to
the innermost module whose forward was running at the time. A storage is counted once, whole (a
view keeps its whole storage alive), by the first module that saved it; parameters and buffers are
not counted (they live anyway) but their casts under autocast are. Inside
:func:`fnevr.nn.recompute.saving_memory`, what a recipe keeps alive is counted instead of the
tensor it rebuilds. Example::

    >>> import torch
    >>> from fnevr.train.memory import SavedTensorLedger
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> with SavedTensorLedger(net) as ledger:
    ...     net(torch.randn(4, 8)).sum().backward()
    >>> ledger.by_module()      # the input of the Linear, the output of the ReLU
    {'0': 128, '1': 128}
"""

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from ..nn import recompute


class SavedTensorLedger:
    """Context manager; ``by_module()`` gives ``{module name: bytes}``. ``root`` names the modules
    (``named_modules``); others (loss modules, say) go by ``extra_names`` or their class name, and
    what is saved outside any module is charged to ``""``. The parameters and buffers of ``root``
    and of the ``extra_names`` modules are resident.

    It keeps every counted storage alive until it is closed, so that a freed address reused by a
    later tensor is not mistaken for the same storage: measure, then drop it.
    """

    def __init__(self, root: nn.Module, extra_names: dict[nn.Module, str] | None = None):
        self.names = {id(m): name for name, m in root.named_modules()}
        for module, prefix in (extra_names or {}).items():
            for name, m in module.named_modules():
                self.names.setdefault(id(m), f"{prefix}.{name}" if name else prefix)
        modules = [root, *(extra_names or {})]
        self.resident = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}
        self.storages, self.bytes = {}, {}
        self._stack, self._handles = [], []

    def _name(self, module):
        return self.names.get(id(module), type(module).__name__)

    def _account(self, packed):
        if torch._C._current_graph_task_id() != -1:  # saved while backward recomputes: transient
            return
        for t in recompute.anchors(packed):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.resident and key not in self.storages:
                self.storages[key] = storage
                owner = self._stack[-1] if self._stack else ""
                self.bytes[owner] = self.bytes.get(owner, 0) + storage.nbytes()

    def _pack(self, t):  # recompute's hooks when they are on (they report to _account), else count t
        if recompute.inside():
            return recompute.pack(t)
        self._account(t)
        return t

    def __enter__(self):
        def enter(module, args):
            self._stack.append(self._name(module))

        def leave(module, args, output):  # returns None: a hook's return value would replace the output
            self._stack.pop()

        self._handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
        self._hooks = [
            torch.autograd.graph.saved_tensors_hooks(self._pack, recompute.unpack),
            recompute.observe(self._account),
        ]
        for h in self._hooks:
            h.__enter__()
        return self

    def __exit__(self, *exc):
        for h in reversed(self._hooks):
            h.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self.storages.clear()

    def by_module(self) -> dict[str, int]:
        return dict(self.bytes)

    def total(self) -> int:
        return sum(self.bytes.values())

    def grouped(self, groups: dict[str, str]) -> dict[str, int]:
        """Sum by the longest matching name prefix in ``groups`` (``{prefix: group}``); names with no
        match go to ``"other"``."""
        out = {}
        for name, n in self.bytes.items():
            match = max((p for p in groups if name == p or name.startswith(p + ".") or p == ""), key=len, default=None)
            group = groups[match] if match is not None else "other"
            out[group] = out.get(group, 0) + n
        return out
