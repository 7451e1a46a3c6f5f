"""The ``fnevr`` command (also ``python -m fnevr``): animate faces, reconstruct videos, train, evaluate.

Run ``fnevr --help`` or ``fnevr <command> --help``.
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch

DESCRIPTION = """FNeVR face animation (Neural Volume Rendering for Face Animation, NeurIPS 2022).

commands:
  train         train FNeVR (one process, or many under torchrun); --demo: a few minutes on a CPU
  evaluate      reconstruction metrics (L1, PSNR, SSIM, LPIPS) of a checkpoint on a test split
  animate       drive a source image with a driving video (relative motion, as in the paper's demo)
  reconstruct   re-create a video from its first frame and its own keypoints (self-reenactment)

Checkpoints: the authors' published ones (config vox-256) or fnevr's own (config stored inside).
"""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA device is available here")
    return device


def _as_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[T, 3, H, W]`` in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 255


def _read_image(path: Path, shape) -> torch.Tensor:
    """The source image as float ``[3, h, w]`` at the config's frame shape."""
    from .data.video import VideoReadError, read_image

    try:
        return _as_float(read_image(path, shape))[0]
    except VideoReadError as e:
        raise SystemExit(f"error: source image: {e}") from e


def _read_video(path: Path, shape) -> tuple[torch.Tensor, float]:
    """float ``[T, 3, h, w]`` at the config's frame shape, and the frame rate (a movie's own, else 25)."""
    from .data.video import MOVIE_SUFFIXES, VideoReadError, read_video

    try:
        frames = _as_float(read_video(path, shape))
    except VideoReadError as e:
        raise SystemExit(f"error: {e}") from e
    fps = 25.0
    if path.suffix.lower() in MOVIE_SUFFIXES:
        import imageio.v3 as iio

        with contextlib.suppress(Exception):  # a movie without a frame rate (a gif) plays at 25 fps
            fps = float(iio.immeta(path).get("fps") or fps)
    return frames, fps


def _load_model(args, device):
    from .checkpoint import load_checkpoint

    try:
        model, _ = load_checkpoint(args.checkpoint, args.config, training_modules=False)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from e
    if args.backend:
        model.set_backend(args.backend)
    return model.to(device).eval()


def _common(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, type=Path, help="published or fnevr checkpoint (.pth/.pt)")
    p.add_argument("--config", default=None,
                   help="bundled config name (vox-256, small) or YAML path (default: the one stored in fnevr "
                        "checkpoints; vox-256 for the authors' published ones)")
    p.add_argument("--out", required=True, type=Path, help="output video (.mp4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per forward pass (default 8)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast (default on CUDA) or fp32 (default on CPU)")
    p.add_argument("--backend", choices=["auto", "reference", "cpu", "cuda", "triton"], default=None,
                   help="fused-op backend for the whole model (default: the config's, normally auto)")
    p.add_argument("--side-by-side", action="store_true", help="write source | driving | result side by side")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's)")


def _run(model, source, driving, fps, args, device, relative, initial_frame=0):
    from tqdm import tqdm

    from .animate import animate
    from .data.video import write_video

    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.bfloat16 if bf16 else None
    with tqdm(total=driving.shape[0], unit="frame", desc=args.command, disable=not sys.stderr.isatty()) as bar:
        pred = animate(model, source.to(device), driving.to(device), relative=relative,
                       adapt_movement_scale=relative, initial_frame=initial_frame, batch_size=args.batch_size,
                       autocast_dtype=autocast, progress=bar.update)
    pred = pred.cpu()
    if args.side_by_side:
        pred = torch.cat([source.expand_as(pred), driving, pred], dim=3)
    frames = (pred.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    write_video(args.out, frames, fps=args.fps or fps)
    return pred


def cmd_animate(args):
    device = _device(args.device)
    model = _load_model(args, device)
    shape = model.config["dataset_params"]["frame_shape"][:2]
    source = _read_image(args.source, shape)
    driving, fps = _read_video(args.driving, shape)
    initial = 0
    if args.find_best_frame:
        from .animate import find_best_frame

        try:
            initial = find_best_frame(source, driving, device=str(device))
        except RuntimeError as e:
            raise SystemExit(f"error: {e}") from e
    _run(model, source, driving, fps, args, device, relative=not args.absolute, initial_frame=initial)
    print(f"wrote {args.out} ({driving.shape[0]} frames)")


def cmd_reconstruct(args):
    device = _device(args.device)
    model = _load_model(args, device)
    driving, fps = _read_video(args.video, model.config["dataset_params"]["frame_shape"][:2])
    pred = _run(model, driving[0], driving, fps, args, device, relative=False)
    if not args.side_by_side:
        print(f"wrote {args.out} ({driving.shape[0]} frames); L1 to the video: {(pred - driving).abs().mean():.4f}")
    else:
        print(f"wrote {args.out} ({driving.shape[0]} frames)")


DEMO = {"config": "small", "steps": 300, "batch_size": 8, "checkpoint_every": 100, "sample_every": 50,
        "log_every": 10, "device": "cpu", "num_workers": 1}


def cmd_train(args):
    from .train import TrainOptions, Trainer

    opts = TrainOptions(config=args.config, data=args.data, out=str(args.out), device=args.device, steps=args.steps,
                        batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                        accumulate=args.accumulate, num_workers=args.num_workers,
                        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
                        log_every=args.log_every, resume=args.resume, seed=args.seed, vgg_weights=args.vgg_weights,
                        perceptual_fallback=args.perceptual_fallback, backend=args.backend,
                        channels_last={"auto": None, "on": True, "off": False}[args.channels_last])
    trainer = Trainer(opts)
    if trainer.is_main:
        print(f"training {'the demo: ' if args.demo else ''}config {args.config} "
              f"on {trainer.device}, {trainer.world} process(es), global batch {trainer.global_batch}, "
              f"perceptual loss: {trainer.perceptual_mode}; writing to {args.out}", file=sys.stderr)
    last = trainer.fit()
    if trainer.is_main:
        print(f"done: step {trainer.step}; last losses "
              + ", ".join(f"{k} {v:.4g}" for k, v in last.items()) + f"\ncheckpoint: {args.out}/checkpoints/latest.pt, "
              f"samples: {args.out}/samples/, log: {args.out}/log.csv")


def cmd_evaluate(args):
    from tqdm import tqdm

    from .train.evaluate import evaluate

    device = _device(args.device)
    with tqdm(unit="video", desc="evaluate", disable=not sys.stderr.isatty()) as bar:
        result = evaluate(args.checkpoint, args.data, args.config, device=device, batch_size=args.batch_size,
                          max_videos=args.max_videos, lpips_weights=args.lpips_weights, backend=args.backend,
                          progress=bar.update)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnevr", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("train", help="train FNeVR",
                       description="Train FNeVR with the paper's losses. Several processes: "
                                   "torchrun --nproc-per-node N -m fnevr train ... (DDP; the batch is split).")
    p.add_argument("--demo", action="store_true",
                   help="the embedded default: the small config on the synthetic talking-head set, on the CPU, "
                        "300 steps (a few minutes); other options override it")
    p.add_argument("--config", default=None, help="bundled config (small, vox-256) or YAML path")
    p.add_argument("--data", default=None, help="dataset folder (FOMM layout: DIR/train, DIR/test); default: the "
                                                "config's root_dir, or the synthetic set when that is null")
    p.add_argument("--out", type=Path, default=None, help="run folder: checkpoints/, samples/, log.csv, tb/")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default auto; the demo: cpu)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the config's epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the config's)")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="auto: on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the generator and keypoint detector")
    p.add_argument("--backend", choices=["auto", "reference", "cpu", "cuda", "triton"], default=None,
                   help="fused-op backend (default: the config's)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default 2; demo 1)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 500)")
    p.add_argument("--sample-every", type=int, default=None, help="steps between sample grids (default 500)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log lines (default 10)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vgg-weights", default=None,
                   help="torchvision VGG19 weights (.pth) for the perceptual loss (default: the torch hub cache)")
    p.add_argument("--perceptual-fallback", choices=["l1", "error"], default="l1",
                   help="without VGG19 weights: pixel L1 on the pyramid (default) or stop with an error")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="reconstruction metrics on a test split",
                       description="Re-create every test video from its first frame and report mean L1, PSNR, SSIM "
                                   "and, given AlexNet weights, LPIPS.")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--config", default=None, help="default: stored in fnevr checkpoints; vox-256 for published ones")
    p.add_argument("--data", required=True, help="dataset folder with a test/ split")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-videos", type=int, default=None)
    p.add_argument("--lpips-weights", default=None,
                   help="torchvision AlexNet weights for LPIPS (default: the torch hub cache; none: LPIPS skipped)")
    p.add_argument("--backend", choices=["auto", "reference", "cpu", "cuda", "triton"], default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("animate", help="drive a source image with a driving video",
                       description="Animate SOURCE with the motion of DRIVING: relative keypoint motion with "
                                   "adapted movement scale (the published demo's reenactment mode).")
    p.add_argument("--source", required=True, type=Path, help="source image (png/jpg, any size)")
    p.add_argument("--driving", required=True, type=Path,
                   help="driving video: mp4/gif/mov, a folder of frames, or a png strip of frames")
    _common(p)
    p.add_argument("--absolute", action="store_true", help="use the driving keypoints as they are (no relative motion)")
    p.add_argument("--find-best-frame", action="store_true",
                   help="start from the driving frame that best matches the source (needs face-alignment)")
    p.set_defaults(func=cmd_animate)

    p = sub.add_parser("reconstruct", help="re-create a video from its first frame",
                       description="Self-reenactment: the first frame of VIDEO is the source, every frame drives it "
                                   "with its own (absolute) keypoints; prints the mean L1 error to the video.")
    p.add_argument("--video", required=True, type=Path, help="video: mp4/gif/mov, a folder of frames, or a png strip")
    _common(p)
    p.set_defaults(func=cmd_reconstruct)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        defaults = dict(DEMO) if args.demo else {"config": "small" if args.config is None else args.config}
        defaults.setdefault("device", "auto")
        fallback = {"steps": None, "batch_size": None, "checkpoint_every": 500, "sample_every": 500,
                    "log_every": 10, "num_workers": 2}
        for key in ("config", "device", "steps", "batch_size", "checkpoint_every", "sample_every", "log_every",
                    "num_workers"):
            if getattr(args, key) is None:
                setattr(args, key, defaults.get(key, fallback.get(key)))
        if args.out is None:
            args.out = Path("runs") / ("demo" if args.demo else "fnevr")
    args.func(args)
    return 0
