"""Sweep the CUDA compositing kernel's tuning knobs (csrc/composite/composite_cuda.cu) on a GPU:
builds one variant per TILE:CHUNKS pair in parallel, checks each against the fp64 reference, then
times its forward and backward kernels with CUDA events at FNeVR's shape.

    python benchmarks/tune_composite_cuda.py 4:4 8:2 8:1
"""

import glob
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(tile: int, chunks: int, workdir: str) -> str:
    from torch.utils.cpp_extension import load

    name = f"fnevr_composite_t{tile}_c{chunks}"
    build_dir = os.path.join(workdir, name)
    os.makedirs(build_dir, exist_ok=True)
    load(
        name,
        [os.path.join(ROOT, "csrc/composite/composite_cuda.cu")],
        is_python_module=False,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        build_directory=build_dir,
        extra_cuda_cflags=[
            "-O3",
            "--expt-relaxed-constexpr",
            f"-DFNEVR_COMPOSITE_TILE={tile}",
            f"-DFNEVR_COMPOSITE_CHUNKS={chunks}",
        ],
    )
    return glob.glob(os.path.join(build_dir, f"{name}*.so"))[0]


def check_and_time(so: str) -> None:
    import torch

    torch.ops.load_library(glob.glob(os.path.join(ROOT, "fnevr", "_C.*.so"))[0])  # the schemas
    torch.ops.load_library(so)
    from fnevr.ops import composite_reference

    fwd, bwd = torch.ops.fnevr._composite_forward, torch.ops.fnevr._composite_backward
    gen = torch.Generator(device="cuda").manual_seed(0)
    for R, D, C in [(5, 13, 3), (7, 8, 256), (3, 2, 1), (4, 8, 40), (33, 8, 512), (2, 3, 1000)]:
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
            for inclusive in (False, True):
                c = torch.rand(R, D, C, device="cuda", generator=gen).to(dtype)
                d = (torch.randn(R, D, device="cuda", generator=gen) * 1.5).to(dtype)
                g = torch.randn(R, C, device="cuda", generator=gen).to(dtype)
                c64, d64 = c.double().requires_grad_(), d.double().requires_grad_()
                ref = composite_reference(c64, d64, transmittance="inclusive" if inclusive else "exclusive")
                ref.backward(g.double())
                got = [fwd(c, d, inclusive, 0), *bwd(g, c, d, inclusive, 0, True)]
                for a, b, what in zip(got, (ref, c64.grad, d64.grad), ("out", "grad color", "grad density")):
                    err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                    assert err <= tol, f"{what} {R}x{D}x{C} {dtype} inclusive={inclusive}: error {err:.2g}"
    print("correct on every checked shape, dtype and mode")

    def time_us(fn, reps=50):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return sorted(times)[reps // 2]

    R, D, C = 4 * 64 * 64, 8, 256
    for dtype in (torch.float32, torch.bfloat16):
        c = torch.rand(R, D, C, device="cuda", dtype=dtype)
        d = torch.randn(R, D, device="cuda", dtype=dtype)
        g = torch.rand(R, C, device="cuda", dtype=dtype)
        size = c.element_size()
        dst = torch.empty_like(c)
        copy = time_us(lambda: dst.copy_(c))
        copy_bw = 2 * c.numel() * size / copy / 1e3
        t_f = time_us(lambda: fwd(c, d, True, 0))
        t_b = time_us(lambda: bwd(g, c, d, True, 0, True))
        bytes_f = (R * D * C + R * D + R * C) * size
        bytes_b = (R * C + 2 * R * D * C + 2 * R * D) * size
        print(
            f"{str(dtype)[6:]:<9} copy {copy_bw:7.0f} GB/s | forward {t_f:7.1f} us {bytes_f / t_f / 1e3:7.0f} GB/s "
            f"{100 * bytes_f / t_f / 1e3 / copy_bw:4.0f}% | backward {t_b:7.1f} us {bytes_b / t_b / 1e3:7.0f} GB/s "
            f"{100 * bytes_b / t_b / 1e3 / copy_bw:4.0f}%"
        )


def main() -> None:
    if sys.argv[1:2] == ["--run"]:
        return check_and_time(sys.argv[2])
    if sys.argv[1:2] == ["--build"]:
        return print(build(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    variants = [tuple(int(x) for x in v.split(":")) for v in sys.argv[1:] or ["4:4"]]
    workdir = tempfile.mkdtemp(prefix="fnevr-tune-")
    builders = {
        v: subprocess.Popen(
            [sys.executable, __file__, "--build", str(v[0]), str(v[1]), workdir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for v in variants
    }
    for (tile, chunks), proc in builders.items():
        out, err = proc.communicate()
        print(f"== TILE={tile} CHUNKS={chunks}", flush=True)
        if proc.returncode != 0:
            print("build failed:", err[-2000:])
            continue
        subprocess.run(
            [sys.executable, __file__, "--run", out.strip().splitlines()[-1]],
            cwd=ROOT,
            env={**os.environ, "FNEVR_NO_EXTENSION": "1"},
        )


if __name__ == "__main__":
    main()
