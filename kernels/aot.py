"""Compile-only Triton: build every kernel launch for a GPU target (sm_90 by default) on a machine
with no GPU, and report what each compiled kernel needs.

Set ``FNEVR_TRITON_COMPILE_ONLY=90`` (a CUDA compute capability, as digits) before importing fnevr.
Triton then runs its full code generator (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for that
target, exactly as on such a GPU, but the launcher does nothing: the ops' own launch code runs on
CPU tensors, so each specialisation compiled is one the launch code really picks (tiles, warps,
dtypes, autotuner configs), and its outputs are left unwritten. The interpreter
(``TRITON_INTERPRET=1``) never runs the code generator; this mode does, so it finds kernels that do
not compile for the GPU, that need more shared memory than it has, or that spill registers.

    FNEVR_TRITON_COMPILE_ONLY=90 python -m fnevr.kernels    # every op, every dtype: a report

What a launch on that GPU would refuse is refused here too: more shared memory than
:data:`MAX_SHARED` raises Triton's ``OutOfResources`` (the launch code's own fallbacks then run),
and so do more threads than the registers allow. Registers, spills (local memory) and stack come
from Triton's bundled ``cuobjdump --dump-resource-usage`` of each cubin.
"""

import dataclasses
import importlib
import os
import re
import subprocess
import tempfile

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver as _driver

ENV = "FNEVR_TRITON_COMPILE_ONLY"
# Opt-in shared memory per block (bytes) and multiprocessors of the GPU each arch stands for here.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
MULTIPROCESSORS = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}
_REGISTERS_PER_SM, _MAX_THREADS = 65536, 1024


@dataclasses.dataclass
class Compiled:
    """One compiled kernel specialisation and what it needs on the target."""

    name: str
    constants: dict
    pointers: tuple  # element types of its pointer arguments, as Triton names them ("fp32", "bf16", ...)
    num_warps: int
    shared: int  # bytes of shared memory per program
    registers: int = -1  # per thread
    local: int = -1  # bytes of local memory per thread: register spills (and local arrays)
    stack: int = -1

    def row(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in sorted(self.constants.items()))
        return (
            f"{self.name:<28} {'/'.join(self.pointers):<10} warps={self.num_warps:<2} regs={self.registers:<3} "
            f"stack={self.stack:<6} local={self.local:<6} shared={self.shared:<7} {consts}"
        )


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes, name: str) -> dict:
    """{"REG", "STACK", "LOCAL", ...} of function `name` in `cubin`, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    block = text.split(f"Function {name}:", 1)
    if len(block) < 2:
        raise RuntimeError(f"cuobjdump lists no function {name!r}:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", block[1].split("Function ", 1)[0])}


class _Utils:
    def __init__(self, arch: int, log: list):
        self.arch, self.log = arch, log

    def get_device_properties(self, device):
        return {
            "max_shared_mem": MAX_SHARED.get(self.arch, 101376),
            "multiprocessor_count": MULTIPROCESSORS.get(self.arch, 132),
            "max_num_regs": _REGISTERS_PER_SM,
            "warpSize": 32,
        }

    def load_binary(self, name, cubin, shared, device):
        usage = resource_usage(cubin, name)
        entry = self.log[-1]  # the launcher of this kernel was made just before (CompiledKernel._init_handles)
        entry.registers, entry.local, entry.stack = usage["REG"], usage["LOCAL"], usage["STACK"]
        # Registers are allocated per warp in units of 256: the most threads a block of this kernel can have.
        per_warp = -(-max(entry.registers, 1) * 32 // 256) * 256
        max_threads = min(_MAX_THREADS, _REGISTERS_PER_SM // per_warp * 32)
        return name, name, entry.registers, entry.local // 4, max_threads  # a module that is not None: loaded

    def unload_module(self, module):
        pass


class CompileOnlyDriver(DriverBase):
    """A Triton driver whose target is a CUDA GPU of compute capability `arch` and whose launches do
    nothing. Every kernel it compiles is appended to :attr:`compiled`."""

    def __init__(self, arch: int = 90):
        self.arch = arch
        self.compiled: list[Compiled] = []
        self.utils = _Utils(arch, self.compiled)
        log = self.compiled

        class Launcher:
            def __init__(self, src, metadata):
                consts = {
                    src.fn.arg_names[k[0]]: v
                    for k, v in getattr(src, "constants", {}).items()
                    if len(k) == 1 and src.fn.arg_names[k[0]].isupper()
                }
                pointers = tuple(sorted({t[1:] for t in src.signature.values() if isinstance(t, str) and t[:1] == "*"}))
                log.append(Compiled(metadata.name, consts, pointers, metadata.num_warps, metadata.shared))

            def __call__(self, *args, **kwargs):
                pass

        self.launcher_cls = Launcher

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        return lambda fn, *args, **kwargs: fn() or 1.0  # one run: every config compiles; the first is taken

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass


def requested_arch() -> int | None:
    """The arch FNEVR_TRITON_COMPILE_ONLY asks for, or None."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{ENV} must be a CUDA compute capability as digits (90 for sm_90), got {value!r}")
    return int(value)


def activate(arch: int = 90) -> CompileOnlyDriver:
    """Make Triton compile for `arch` and launch nothing, from now on in this process."""
    active = getattr(_driver, "_active", None)  # not .active: with no GPU, making the default one raises
    if isinstance(active, CompileOnlyDriver) and active.arch == arch:
        return active
    d = CompileOnlyDriver(arch)
    _driver.set_active(d)
    return d


# --- the launches that select every configuration of every op ------------------------------------
# Shapes are small; each is chosen for the tile, warps or code path it makes the launch code pick.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fwd_bwd(fn, *inputs):
    """fn(*inputs) forward, then backward into every input (one launch of each kernel)."""
    inputs = [t.requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def _launches(op: str):
    """`op`'s compile-only launches: ``compile_launches(dtype)`` in its kernels/<op>.py."""
    return importlib.import_module(f"fnevr.kernels.{op}").compile_launches


def compile_op(op: str, dtypes=DTYPES) -> list[Compiled]:
    """Run `op`'s launches for each dtype in compile-only mode; every kernel compiled, in order.
    Raises what Triton raises: a kernel that does not compile, or does not fit (OutOfResources)."""
    d = _driver._active
    if not isinstance(d, CompileOnlyDriver):
        raise RuntimeError(f"compile-only mode is off: set {ENV}=90 before importing fnevr")
    start = len(d.compiled)
    for dtype in dtypes:
        _launches(op)(dtype)
    return d.compiled[start:]
