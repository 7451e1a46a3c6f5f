import os

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. This must be set
# before fnevr (and so triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Parameters that split a test's cases into groups for the device check: each backend of a test is
# proved on its own (see _each_choice).
_GROUP_PARAMS = ("backend", "device", "compiler")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark the GPU tests and choose the ones benchmarks/gpu_check.sh runs in its time box.

    - ``gpu``: every case whose ``device`` parameter is "cuda", and tests marked ``gpu`` by hand
      (CUDA-only tests without that parameter). ``-m "not gpu"`` is what a machine without a GPU runs.
    - ``gpu_quick``: of the GPU cases without fp64 and not marked ``gpu_heavy`` (cold compiles that
      take long), a set in which every value of every parameter of each test and backend occurs at
      least once: each kernel specialisation the parameters select (dtype, mode, layout, ...) runs,
      without their full cross product.
    - ``gpu_check`` (the full check): ``gpu_quick`` plus, from every GPU case, what covers the values
      still missing (fp64, heavy cases).
    """
    gpu = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("gpu"):
            gpu.append(item)
    quick = _each_choice([i for i in gpu if not _heavy(i)], [])
    full = _each_choice(gpu, quick)
    for item in quick:
        item.add_marker(pytest.mark.gpu_quick)
    for item in full:
        item.add_marker(pytest.mark.gpu_check)


def _heavy(item) -> bool:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if any(v is torch.float64 for v in params.values()):
        return True
    return any(
        mark.kwargs.get("backend", params.get("backend")) == params.get("backend")
        for mark in item.iter_markers("gpu_heavy")
    )


def _each_choice(items, chosen):
    """`chosen` plus, per test function and backend, greedily the items that add the most
    (parameter, value) pairs not yet covered, until every pair of `items` is: each-choice coverage."""
    groups = {}
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        key = (item.path, item.originalname) + tuple(str(params.get(p)) for p in _GROUP_PARAMS)
        groups.setdefault(key, []).append((item, _choices(item)))
    picked = list(chosen)
    chosen_ids = {id(i) for i in chosen}
    for members in groups.values():
        covered = set().union(*[pairs for item, pairs in members if id(item) in chosen_ids])
        todo = [(item, pairs) for item, pairs in members if id(item) not in chosen_ids]
        if not any(id(item) in chosen_ids for item, _ in members) and todo:
            covered |= todo[0][1]  # a group with nothing chosen yet starts with its first case
            picked.append(todo.pop(0)[0])
        while todo:
            best = max(range(len(todo)), key=lambda k: len(todo[k][1] - covered))
            if not todo[best][1] - covered:
                break
            covered |= todo[best][1]
            picked.append(todo.pop(best)[0])
    return picked


def _choices(item) -> frozenset:
    """(argnames, values) of each parametrize of `item` but the grouping ones: the names of one
    parametrize ("mode,padding,align_corners") are one choice, their combinations being its values."""
    if not hasattr(item, "callspec"):
        return frozenset()
    choices = set()
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0]
        names = tuple(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
        params = item.callspec.params
        if names[0] in params and not set(names) & set(_GROUP_PARAMS):
            choices.add((names, repr(tuple(params[n] for n in names))))
    return frozenset(choices)
