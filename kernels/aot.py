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
import itertools
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
        return (f"{self.name:<28} {'/'.join(self.pointers):<10} warps={self.num_warps:<2} regs={self.registers:<3} "
                f"stack={self.stack:<6} local={self.local:<6} shared={self.shared:<7} {consts}")


def _cuobjdump() -> str:
    from triton import knobs
    return knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes, name: str) -> dict:
    """{"REG", "STACK", "LOCAL", ...} of function `name` in `cubin`, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    block = text.split(f"Function {name}:", 1)
    if len(block) < 2:
        raise RuntimeError(f"cuobjdump lists no function {name!r}:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", block[1].split("Function ", 1)[0])}


class _Utils:
    def __init__(self, arch: int, log: list):
        self.arch, self.log = arch, log

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED.get(self.arch, 101376),
                "multiprocessor_count": MULTIPROCESSORS.get(self.arch, 132), "max_num_regs": _REGISTERS_PER_SM,
                "warpSize": 32}

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
                consts = {src.fn.arg_names[k[0]]: v for k, v in getattr(src, "constants", {}).items()
                          if len(k) == 1 and src.fn.arg_names[k[0]].isupper()}
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


def _fwd_bwd(fn, *inputs):
    """fn(*inputs) forward, then backward into every input (one launch of each kernel)."""
    inputs = [t.requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def _composite(dtype):
    from fnevr.ops import composite
    cases = [((4096, 8, 256), {}),  # FNeVR's shape class: >= 2^22 elements, the autotuner's configs
             ((64, 8, 3), {}), ((64, 8, 64), {}), ((64, 8, 128), {}), ((64, 8, 300), {}),  # tiles by C
             ((64, 40, 16), {}),  # D above the unrolled limit
             ((64, 8, 16), {"transmittance": "exclusive", "density_activation": "softplus"}),
             ((64, 8, 16), {"density_activation": "none"})]
    for (R, D, C), kw in cases:
        kw = {"transmittance": "inclusive", **kw}
        _fwd_bwd(lambda c, d: composite(c, d, backend="triton", **kw), torch.rand(R, D, C, dtype=dtype),
                 torch.randn(R, D, dtype=dtype))


def _grid_sample(dtype):
    """Every tile configuration in every dtype; each other (mode, padding, align_corners,
    deterministic) code path once, the paths spread over the dtypes."""
    from fnevr.ops import grid_sample

    def run(C, mode="bilinear", padding="zeros", align=False, channels_last=False, deterministic=(False,)):
        x = torch.rand(1, C, 8, 8, dtype=dtype)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        g = torch.rand(1, 4, 4, 2, dtype=dtype) * 2 - 1
        for det in deterministic:  # a second run compiles only the input gradient's FIXED variant
            _fwd_bwd(lambda x, g: grid_sample(x, g, mode, padding, align, backend="triton", deterministic=det),
                     x.detach().clone(), g.detach().clone())

    for C in (1, 3, 8):  # NCHW tiles: UNROLL 1 (C = 1), 4, 8
        run(C, deterministic=(False, True) if C == 8 else (False,))
    run(64, channels_last=True, deterministic=(False, True))  # lanes along the channels
    paths = [p for p in itertools.product(("bilinear", "nearest"), ("zeros", "border", "reflection"), (False, True))
             if p != ("bilinear", "zeros", False)]
    for i, (mode, padding, align) in enumerate(paths):
        if DTYPES[i % len(DTYPES)] == dtype:
            run(3, mode, padding, align, deterministic=(False, True))
    if dtype == DTYPES[0]:
        run(3, channels_last=True)  # a channels_last input with few channels: NCHW's tiles, other strides


def _spade_norm(dtype):
    from fnevr.ops import spade_norm
    # One tile, several tiles (reductions cut into pieces and merged, for sm_90's 132 SMs), wide C; a
    # batch of 2, so that merges span sample groups and no size is the constant 1. No activation: its
    # code differs from relu's in one select, so on one shape only.
    modes = (("instance", "relu"), ("batch", "leaky_relu"))
    cases = [(shape, m) for shape in ((2, 4, 8, 8), (2, 8, 64, 128), (2, 200, 8, 8)) for m in modes]
    for shape, (norm, act) in cases + [((2, 8, 64, 128), ("instance", None))]:
        for cl in (False, True):
            for full in (True, False):  # gamma/beta per element, or per channel
                fmt = torch.channels_last if cl else torch.contiguous_format
                mshape = shape if full else (1, shape[1], 1, 1)
                _fwd_bwd(lambda x, g, b: spade_norm(x, g, b, norm=norm, activation=act, backend="triton"),
                         torch.randn(shape, dtype=dtype).to(memory_format=fmt), torch.randn(mshape, dtype=dtype),
                         torch.randn(mshape, dtype=dtype))


def _mlp_composite(dtype):
    from fnevr.model.render import SampleMLP
    from fnevr.ops import mlp_composite
    # fp32 dots are tf32x3, or plain TF32 where PyTorch's own matmuls may use it: both.
    tf32_flags = (False, True) if dtype == torch.float32 else (False,)
    for e, hidden, D in ((16, 128, 8), (8, 32, 4)):  # vox-256's ray head; the small config's
        mlp = SampleMLP(color_dim=e, shape_dim=e, hidden=hidden).to(dtype)
        params = [p for name, p in mlp.named_parameters() if not name.startswith("color_out")]
        for tf32 in tf32_flags:
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                _fwd_bwd(lambda c, s, *p: mlp_composite(c, s, list(p), transmittance="inclusive", backend="triton"),
                         torch.rand(64, D, e, dtype=dtype), torch.rand(64, D, e, dtype=dtype),
                         *[p.detach().clone() for p in params])
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved


OPS = {"composite": _composite, "grid_sample": _grid_sample, "spade_norm": _spade_norm,
       "mlp_composite": _mlp_composite}


def compile_op(op: str, dtypes=DTYPES) -> list[Compiled]:
    """Run `op`'s launches for each dtype in compile-only mode; every kernel compiled, in order.
    Raises what Triton raises: a kernel that does not compile, or does not fit (OutOfResources)."""
    d = _driver._active
    if not isinstance(d, CompileOnlyDriver):
        raise RuntimeError(f"compile-only mode is off: set {ENV}=90 before importing fnevr")
    start = len(d.compiled)
    for dtype in dtypes:
        OPS[op](dtype)
    return d.compiled[start:]

