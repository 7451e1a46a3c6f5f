"""Per-frame latency of live animation at batch 1: fnevr's streaming API (``fnevr.Animator``) against
the authors' published FNeVR code with the same weights (random, vox-256 layout).

    git clone https://github.com/zengbohan0217/FNeVR /tmp/FNeVR   # their code is not part of fnevr
    pip install einops scipy scikit-image                          # what their modules and demo import
    python benchmarks/bench_latency.py --published /tmp/FNeVR [--device cuda] [--save benchmarks/results]
    python benchmarks/bench_latency.py --smoke                     # small config, fnevr only: checks that it runs

Two figures per provider, each the median over ``--frames`` driving frames after warm-up; the
providers are timed in turn for ``--rounds`` rounds and each keeps its best median:

* **model**: one driving frame already at 256², to the animated 256² frame: the keypoint detector
  on the driving frame, relative motion, the generator (the source's keypoints are computed once).
* **end to end**: a 640x480 RGB uint8 camera frame to the output frame. fnevr: face detection
  (OpenCV Haar), the smoothed crop, the model, and paste-back into the 512² source. Published: what
  their demo does per frame, which has no face detection: skimage's resize of the whole frame to
  256², the model, and the conversion back to uint8 (its output is the 256² frame).

Published = their ``KPDetector`` + ``OcclusionAwareGenerator_SPADE`` and their demo's
``normalize_kp``, eager fp32 (their demo's precision). fnevr rows: ``fp32`` eager, ``bf16`` autocast,
and with ``compile`` (``torch.compile(mode="reduce-overhead")``: CUDA graphs on CUDA).
"""

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]


def camera_frame(t: int, size=(480, 640)) -> np.ndarray:
    """The astronaut's face moved and turned over a generated background (as tests/test_face.py)."""
    import cv2
    from skimage.data import astronaut

    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    frame = np.clip(np.stack([x * 0.3, y * 0.4 + 40, 120 + 0 * x], -1), 0, 255).astype(np.uint8)
    matrix = cv2.getRotationMatrix2D((225.0, 117.0), 10.0 * np.sin(t), 1.0)
    matrix[:, 2] += (w / 2 - 225.0 + 4 * t, h / 2 - 117.0 + 2 * t)
    cv2.warpAffine(astronaut(), matrix, (w, h), dst=frame, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_TRANSPARENT)
    return frame


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_frame(step, frames, device, warmup: int) -> float:
    """Median seconds of ``step(frame)`` over ``frames`` after ``warmup`` calls."""
    for frame in frames[:warmup]:
        step(frame)
    sync(device)
    times = []
    for frame in frames:
        start = time.perf_counter()
        step(frame)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def published_provider(repo: Path, ckpt: dict, device, source: np.ndarray):
    """Their modules and demo's per-frame code, loaded from a checkout of their repository."""
    import yaml

    sys.path.insert(0, str(repo))
    from demo import normalize_kp  # their demo's relative-motion code (scipy ConvexHull)
    from modules.generator import OcclusionAwareGenerator_SPADE
    from modules.keypoint_detector import KPDetector
    from skimage import img_as_ubyte
    from skimage.transform import resize

    config = yaml.safe_load((repo / "config" / "vox-256.yaml").read_text())["model_params"]
    generator = OcclusionAwareGenerator_SPADE(**config["generator_params"], **config["common_params"])
    kp_detector = KPDetector(**config["kp_detector_params"], **config["common_params"])
    generator.load_state_dict(ckpt["generator"])
    kp_detector.load_state_dict(ckpt["kp_detector"])
    generator.to(device).eval()
    kp_detector.to(device).eval()
    to_tensor = lambda image: torch.tensor(image[np.newaxis].astype(np.float32)).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        src = to_tensor(resize(source, (256, 256))[..., :3])
        kp_source = kp_detector(src)
        state = {}

    @torch.no_grad()
    def model(frame: torch.Tensor):
        kp_driving = kp_detector(frame)
        initial = state.setdefault("initial", kp_driving)
        kp_norm = normalize_kp(
            kp_source=kp_source,
            kp_driving=kp_driving,
            kp_driving_initial=initial,
            use_relative_movement=True,
            use_relative_jacobian=True,
            adapt_movement_scale=True,
        )
        return generator(src, kp_source=kp_source, kp_driving=kp_norm)["prediction"]

    def end_to_end(frame: np.ndarray):
        out = model(to_tensor(resize(frame, (256, 256))[..., :3]))
        return img_as_ubyte(np.transpose(out.cpu().numpy(), [0, 2, 3, 1])[0].clip(0, 1))

    return model, end_to_end


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=Path, default=None, help="a checkout of zengbohan0217/FNeVR")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=8, help="timed frames per figure and round (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all providers (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--providers", nargs="+", default=["published", "fp32", "bf16", "fp32-compile", "bf16-compile"])
    parser.add_argument("--save", type=Path, default=None, help="directory to write latency-<device>-<date>.txt into")
    parser.add_argument("--smoke", action="store_true", help="the small config, fnevr only, 2 frames")
    args = parser.parse_args()
    if "published" in args.providers and args.published is None and not args.smoke:
        parser.error("--published PATH (a checkout of zengbohan0217/FNeVR) is needed for the published row")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from test_model import random_published_checkpoint

    import fnevr
    from fnevr.checkpoint import load_checkpoint
    from fnevr.face import to_float

    frames = args.frames if not args.smoke else 2
    rounds = args.rounds if not args.smoke else 1
    config = "small" if args.smoke else "vox-256"
    providers = [p for p in args.providers if not (args.smoke and p == "published")]
    ckpt = random_published_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "published.pth"
        torch.save(ckpt, path)
        model = (
            load_checkpoint(path, "vox-256", training_modules=False)[0]
            if not args.smoke
            else fnevr.FNeVR("small", training_modules=False)
        )
    from skimage.data import astronaut

    source = astronaut()
    camera = [camera_frame(t) for t in range(frames + 3)]
    size = int(model.config["dataset_params"]["frame_shape"][0])
    squares = [
        torch.nn.functional.interpolate(to_float(f)[None, :, 80:400, 160:480], size=size, mode="area")[0].to(device)
        for f in camera
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    env = f"commit {commit.strip() or '?'}, torch {torch.__version__}, {device}" + (
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    )
    lines = [
        f"fnevr latency per frame, batch 1, config {config}: {datetime.date.today()}, {env}",
        "",
        "| provider | model (ms) | end to end (ms) | model vs published | end to end vs published |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    steps = {}
    for name in providers:
        if name == "published":
            published_model, e2e_step = published_provider(args.published, ckpt, device, source)
            steps[name] = (lambda square: published_model(square[None]), e2e_step, 2)
        else:
            precision, _, compiled = name.partition("-")
            animator = fnevr.Animator(
                model, device=device, crop=True, paste_back=True, precision=precision, compile=compiled == "compile"
            )
            animator.set_source(source)
            steps[name] = (lambda square, a=animator: a._animate(square[None]), animator, 4 if compiled else 2)
    results: dict = {}
    for _ in range(rounds):  # providers in turn, the best median of the rounds kept
        for name, (model_step, e2e_step, warm) in steps.items():
            timed = (per_frame(model_step, squares, device, warm), per_frame(e2e_step, camera, device, warm))
            results[name] = tuple(min(a, b) for a, b in zip(results.get(name, timed), timed))
    base = results.get("published")
    for name, timed in results.items():
        ratio = lambda i: "-" if base is None else f"{base[i] / timed[i]:.2f}x"
        line = f"| {name} | {timed[0] * 1e3:.1f} | {timed[1] * 1e3:.1f} | {ratio(0)} | {ratio(1)} |"
        lines.append(line)
        print(line, flush=True)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        out = args.save / f"latency-{device.type}-{datetime.date.today()}.txt"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    sys.exit(main())
