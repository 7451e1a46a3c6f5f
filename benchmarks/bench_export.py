"""One animated frame (keypoint detector on the driving frame, then the generator) in eager PyTorch,
as AOTInductor packages and as ONNX graphs in ONNX Runtime: latency, and each one's largest
difference from eager relative to the largest output.

    python benchmarks/bench_export.py [--config vox-256] [--batch 1] [--device cpu] [--save DIR]
    python benchmarks/bench_export.py --smoke      # the small config, one round: checks that it runs

Weights: random (``torch.manual_seed(0)``), eval mode, fp32. Eager runs under ``torch.inference_mode``
with ``backend="auto"`` (its no-grad shortcuts included). The exports are written to a temporary
folder by ``fnevr.export`` (time to export and compile reported). Latency: the median of ``--steps``
frames, best of ``--rounds`` rounds, the three taking turns.
"""

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def median_ms(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vox-256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-onnx", action="store_true", help="leave out ONNX Runtime")
    parser.add_argument("--smoke", action="store_true", help="small config, one round of 2 steps")
    parser.add_argument("--save", type=Path, default=None, help="folder for the results (.txt)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.config, args.steps, args.rounds = "small", 2, 1

    import fnevr
    from fnevr import export

    torch.manual_seed(0)
    model = fnevr.FNeVR(args.config, training_modules=False).eval().to(args.device)
    kp_in = export.example_inputs(model, "kp_detector", args.batch)
    gen_in = export.example_inputs(model, "generator", args.batch)
    kp_graph, gen_graph = export.graph(model, "kp_detector"), export.graph(model, "generator")
    with torch.inference_mode():
        want = gen_graph(*gen_in)

    def eager():
        with torch.inference_mode():
            kp_graph(*kp_in)
            return gen_graph(*gen_in)

    providers, lines = {"eager": eager}, []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = export.export_aoti(model, Path(folder) / "aoti")
        lines.append(f"AOTInductor: exported and compiled in {time.perf_counter() - start:.0f} s")
        kp_aoti, gen_aoti = (torch._inductor.aoti_load_package(str(paths[p])) for p in export.PARTS)
        providers["aotinductor"] = lambda: (kp_aoti(*kp_in), gen_aoti(*gen_in))[1]
        if not args.no_onnx:
            import onnxruntime

            start = time.perf_counter()
            onnx_paths = export.export_onnx(model.cpu(), Path(folder) / "onnx", check=False)
            model.to(args.device)
            lines.append(f"ONNX: exported in {time.perf_counter() - start:.0f} s (opset {export.DEFAULT_OPSET})")
            provider = "CUDAExecutionProvider" if args.device.startswith("cuda") else "CPUExecutionProvider"
            kp_s, gen_s = (onnxruntime.InferenceSession(str(onnx_paths[p]), providers=[provider]) for p in export.PARTS)
            kp_feed = {n: t.cpu().numpy() for n, t in zip(export.input_names(model, "kp_detector"), kp_in)}
            gen_feed = {n: t.cpu().numpy() for n, t in zip(export.input_names(model, "generator"), gen_in)}
            providers[f"onnxruntime {onnxruntime.__version__} ({provider})"] = lambda: torch.from_numpy(
                (kp_s.run(None, kp_feed), gen_s.run(None, gen_feed))[1][0]
            )
        best = dict.fromkeys(providers, float("inf"))
        for _ in range(args.rounds):
            for name, fn in providers.items():
                best[name] = min(best[name], median_ms(fn, args.steps))
        errors = {name: float((fn().to(want) - want).abs().max() / want.abs().max()) for name, fn in providers.items()}
    H, W = model.config["dataset_params"]["frame_shape"][:2]
    header = (
        f"# bench_export: config {args.config} ({H}x{W}), batch {args.batch}, {args.device}, fp32, random weights; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {datetime.date.today()}\n"
        f"# per frame: keypoints of the driving frame + generator; median of {args.steps}, best of {args.rounds}"
    )
    rows = [f"{'provider':<48} {'ms/frame':>9} {'vs eager':>9} {'max |diff| / max':>17}"]
    for name, ms in best.items():
        rows.append(f"{name:<48} {ms:9.1f} {best['eager'] / ms:8.2f}x {errors[name]:17.1e}")
    text = "\n".join([header, *lines, *rows]) + "\n"
    print(text, end="")
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        name = f"export-{args.config}-{args.device.split(':')[0]}-b{args.batch}-{datetime.date.today()}.txt"
        (args.save / name).write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
