"""The ``fnevr`` command (also ``python -m fnevr``): animate faces, reconstruct videos, train, evaluate.

Run ``fnevr --help`` or ``fnevr <command> --help``.

Errors are one line on stderr, ``fnevr <command>: error: ...``, with exit code 2 for a usage
mistake (an argument out of range, a path that is missing or of the wrong kind), found before any
heavy work, and 1 for a failure at run time (an unreadable file, a run folder in use, a diverging
run). ``--debug`` shows the traceback instead. Output videos are written to a temporary name and
renamed once complete.
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from .ops import BACKENDS

BACKEND_CHOICES = ["auto", *BACKENDS]  # the fused ops' backends, from their registry

DESCRIPTION = """FNeVR face animation (Neural Volume Rendering for Face Animation, NeurIPS 2022).

commands:
  train         train FNeVR (one process, or many under torchrun); --demo: a few minutes on a CPU
  evaluate      reconstruction metrics (L1, PSNR, SSIM, LPIPS) of a checkpoint on a test split
  animate       drive a source image with a driving video (relative motion, as in the paper's demo)
  reconstruct   re-create a video from its first frame and its own keypoints (self-reenactment)

Checkpoints: the authors' published ones (config vox-256) or fnevr's own (config stored inside).
Errors: one line, exit code 2 for usage, 1 at run time; --debug shows the traceback.
"""

VIDEO_OUT_SUFFIXES = (".mp4", ".mov")


class CommandError(Exception):
    """A failure to report in one line; ``code`` is the exit status (1: at run time)."""

    code = 1


class UsageError(CommandError):
    """A bad argument (exit status 2), found before any work is done."""

    code = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; we report one line, exit 2
        raise UsageError(message, self.prog)


# --- argument types and checks -------------------------------------------------------------------------


def _number(kind, low, strict, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 0, True, "a positive integer")
count = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive number")


def _device(name: str) -> torch.device:
    from .device import parse_device

    try:
        return parse_device(name)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


def _existing_file(path, option: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; expected a file")
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    return path


def _existing(path, option: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such file or folder")
    return path


def _dataset_folder(path, split: str, option: str = "--data") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{option} {path}: no such folder")
    if not (path / split).is_dir():
        raise UsageError(f"{option} {path} has no {split}/ folder (expected the FOMM layout DIR/train, DIR/test)")
    return path


def _config(name):
    from .config import load_config

    try:
        return load_config(name)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--config: {e}") from None
    except Exception as e:
        raise UsageError(f"--config {name}: {type(e).__name__}: {e}") from None


def _video_out(path: Path) -> Path:
    """Check that the output video can be written (suffix, not a folder, folder writable: a probe file
    is created and removed there), before any work; nothing is left behind."""
    if path.suffix.lower() not in VIDEO_OUT_SUFFIXES:
        raise UsageError(f"--out {path}: expected a video file name ending in {' or '.join(VIDEO_OUT_SUFFIXES)}")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; expected a video file name")
    folder = next(p for p in (path.absolute().parent, *path.absolute().parents) if p.exists())
    if not folder.is_dir():
        raise UsageError(f"--out {path}: {folder} is a file, not a folder")
    try:  # the folders that are missing are created at the end, in this one
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"--out {path}: cannot write to {folder} ({e.strerror or e})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"--out {path} exists and is read-only")
    return path


def _as_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> float ``[T, 3, H, W]`` in [0, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 255


def _read_image(path: Path, shape) -> torch.Tensor:
    """The source image as float ``[3, h, w]`` at the config's frame shape."""
    from .data.video import VideoReadError, read_image

    try:
        return _as_float(read_image(path, shape))[0]
    except VideoReadError as e:
        raise CommandError(f"source image: {e}") from e


def _read_video(path: Path, shape) -> tuple[torch.Tensor, float]:
    """float ``[T, 3, h, w]`` at the config's frame shape, and the frame rate (a movie's own, else 25)."""
    from .data.video import MOVIE_SUFFIXES, VideoReadError, read_video

    try:
        frames = _as_float(read_video(path, shape))
    except VideoReadError as e:
        raise CommandError(str(e)) from e
    fps = 25.0
    if path.suffix.lower() in MOVIE_SUFFIXES:
        import imageio.v3 as iio

        with contextlib.suppress(Exception):  # a movie without a frame rate (a gif) plays at 25 fps
            fps = float(iio.immeta(path).get("fps") or fps)
    return frames, fps


def _load_model(args, device):
    from .checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint, args.config, training_modules=False)
    if args.backend:
        model.set_backend(args.backend)
    return model.to(device).channels_last().eval()


def _common(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, type=Path, help="published or fnevr checkpoint (.pth/.pt)")
    p.add_argument(
        "--config",
        default=None,
        help="bundled config name (vox-256, small) or YAML path (default: the one stored in fnevr "
        "checkpoints; vox-256 for the authors' published ones)",
    )
    p.add_argument("--out", required=True, type=Path, help="output video (.mp4 or .mov)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="frames per forward pass (default 8)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="bf16 autocast (default on CUDA) or fp32 (default on CPU)",
    )
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=None,
        help="fused-op backend for the whole model (default: the config's, normally auto)",
    )
    p.add_argument("--side-by-side", action="store_true", help="write source | driving | result side by side")
    p.add_argument("--fps", type=positive_float, default=None, help="output frame rate (default: the driving video's)")


def _run(model, source, driving, fps, args, device, relative, initial_frame=0):
    from tqdm import tqdm

    from .animate import animate
    from .data.video import write_video

    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.bfloat16 if bf16 else None
    with tqdm(total=driving.shape[0], unit="frame", desc=args.command, disable=not sys.stderr.isatty()) as bar:
        pred = animate(
            model,
            source.to(device),
            driving.to(device),
            relative=relative,
            adapt_movement_scale=relative,
            initial_frame=initial_frame,
            batch_size=args.batch_size,
            autocast_dtype=autocast,
            progress=bar.update,
        )
    pred = pred.cpu()
    if args.side_by_side:
        pred = torch.cat([source.expand_as(pred), driving, pred], dim=3)
    frames = (pred.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    write_video(args.out, frames, fps=args.fps if args.fps is not None else fps)
    return pred


def _check_inference(args, *inputs):
    """animate/reconstruct: every path and option, before the model is loaded."""
    device = _device(args.device)
    _existing_file(args.checkpoint, "--checkpoint")
    if args.config is not None:
        _config(args.config)
    for option, path in inputs:
        _existing(path, option)
    _video_out(args.out)
    return device


def cmd_animate(args):
    device = _check_inference(args, ("--source", args.source), ("--driving", args.driving))
    model = _load_model(args, device)
    shape = model.config["dataset_params"]["frame_shape"][:2]
    source = _read_image(args.source, shape)
    driving, fps = _read_video(args.driving, shape)
    initial = 0
    if args.find_best_frame:
        from .animate import find_best_frame

        initial = find_best_frame(source, driving, device=str(device))
    _run(model, source, driving, fps, args, device, relative=not args.absolute, initial_frame=initial)
    print(f"wrote {args.out} ({driving.shape[0]} frames)")


def cmd_reconstruct(args):
    device = _check_inference(args, ("--video", args.video))
    model = _load_model(args, device)
    driving, fps = _read_video(args.video, model.config["dataset_params"]["frame_shape"][:2])
    pred = _run(model, driving[0], driving, fps, args, device, relative=False)
    if not args.side_by_side:
        print(f"wrote {args.out} ({driving.shape[0]} frames); L1 to the video: {(pred - driving).abs().mean():.4f}")
    else:
        print(f"wrote {args.out} ({driving.shape[0]} frames)")


# The demo fits `make demo` on a fresh 2-core machine into 6 minutes, install and build included:
# 250 steps, no loader worker (a batch loads in ~60 ms, less than a worker process costs to start
# each 5-step epoch) and channels_last convolutions (~12% faster steps there). At 64x64 memory is
# no concern, and keeping every activation is ~6% faster there.
DEMO = {
    "config": "small",
    "steps": 250,
    "batch_size": 8,
    "checkpoint_every": 100,
    "sample_every": 50,
    "log_every": 10,
    "device": "cpu",
    "num_workers": 0,
    "channels_last": "on",
    "memory_saving": False,
}


def cmd_train(args):
    _device(args.device)
    config = _config(args.config)
    if args.data is not None:
        _dataset_folder(args.data, "train")
    if args.vgg_weights is not None:
        _existing_file(args.vgg_weights, "--vgg-weights")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; expected a run folder")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.checkpoint_activations and (args.compile or args.memory_saving is False):
        raise UsageError(
            "--checkpoint-activations goes with memory saving and without --compile (torch.compile "
            "plans its own recomputation)"
        )
    from .train import Trainer, TrainOptions

    if args.demo and args.demo_out and not args.resume:
        print(
            f"fnevr train: the demo starts afresh in {args.out}, and replaces any earlier demo run there "
            f"(--resume continues that one instead, --out DIR writes elsewhere)",
            file=sys.stderr,
        )
    opts = TrainOptions(
        config=config,
        data=args.data,
        out=str(args.out),
        device=args.device,
        steps=args.steps,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        memory_saving=args.memory_saving,
        checkpoint_activations=args.checkpoint_activations,
        accumulate=args.accumulate,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        log_every=args.log_every,
        resume=args.resume,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        seed=args.seed,
        vgg_weights=args.vgg_weights,
        perceptual_fallback=args.perceptual_fallback,
        backend=args.backend,
        channels_last={"auto": None, "on": True, "off": False}[args.channels_last],
    )
    trainer = Trainer(opts)
    if trainer.is_main:
        print(
            f"training {'the demo: ' if args.demo else ''}config {args.config} "
            f"on {trainer.device}, {trainer.world} process(es), global batch {trainer.global_batch}, "
            f"perceptual loss: {trainer.perceptual_mode}; writing to {args.out}",
            file=sys.stderr,
        )
    last = trainer.fit()
    if trainer.is_main:
        print(
            f"done: step {trainer.step}; last losses "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items())
            + f"\ncheckpoint: {args.out}/checkpoints/latest.pt, "
            f"samples: {args.out}/samples/, log: {args.out}/log.csv"
        )


def cmd_evaluate(args):
    from tqdm import tqdm

    device = _device(args.device)
    _existing_file(args.checkpoint, "--checkpoint")
    if args.config is not None:
        _config(args.config)
    _dataset_folder(args.data, "test")
    if args.lpips_weights is not None:
        _existing_file(args.lpips_weights, "--lpips-weights")
    from .train.evaluate import evaluate

    with tqdm(unit="video", desc="evaluate", disable=not sys.stderr.isatty()) as bar:
        result = evaluate(
            args.checkpoint,
            args.data,
            args.config,
            device=device,
            batch_size=args.batch_size,
            max_videos=args.max_videos,
            lpips_weights=args.lpips_weights,
            backend=args.backend,
            progress=bar.update,
        )
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fnevr", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train FNeVR",
        description="Train FNeVR with the paper's losses. Several processes: "
        "torchrun --nproc-per-node N -m fnevr train ... (DDP; the batch is split).",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="the embedded default: the small config on the synthetic talking-head set, on the CPU, "
        "250 steps (a few minutes), starting afresh in runs/demo; other options override it",
    )
    p.add_argument("--config", default=None, help="bundled config (small, vox-256) or YAML path")
    p.add_argument(
        "--data",
        default=None,
        help="dataset folder (FOMM layout: DIR/train, DIR/test); default: the "
        "config's root_dir, or the synthetic set when that is null",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder: checkpoints/, samples/, log.csv, tb/")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default auto; the demo: cpu)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default: the config's epochs)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch size (default: the config's)")
    p.add_argument("--accumulate", type=positive_int, default=1, help="micro-batches per optimiser step")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default=None,
        help="auto (default): on CUDA; the demo: on",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the generator and keypoint detector")
    p.add_argument(
        "--no-memory-saving",
        dest="memory_saving",
        action="store_false",
        default=None,
        help="keep every activation for backward, as the published recipe (default, but for the demo: "
        "the fused ray MLP and recomputed cheap activations: same results, about half the memory)",
    )
    p.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="also recompute the decoder and hourglass blocks in backward: far less memory, ~10%% slower steps",
    )
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help="fused-op backend (default: the config's)")
    p.add_argument("--num-workers", type=count, default=None, help="DataLoader workers (default 2; demo 0)")
    p.add_argument(
        "--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints (default 500)"
    )
    p.add_argument("--sample-every", type=positive_int, default=None, help="steps between sample grids (default 500)")
    p.add_argument("--log-every", type=positive_int, default=None, help="steps between log lines (default 10)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest readable checkpoint (latest.pt, else the highest step-N.pt)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (its checkpoints/, samples/, tb/, log.csv); without it or "
        "--resume, a folder that holds a run is an error",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="go on after a NaN/inf loss (default: stop at the first one, naming the loss term)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vgg-weights",
        default=None,
        help="torchvision VGG19 weights (.pth) for the perceptual loss (default: the torch hub cache)",
    )
    p.add_argument(
        "--perceptual-fallback",
        choices=["l1", "error"],
        default="l1",
        help="without VGG19 weights: pixel L1 on the pyramid (default) or stop with an error",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="reconstruction metrics on a test split",
        description="Re-create every test video from its first frame and report mean L1, PSNR, SSIM "
        "and, given AlexNet weights, LPIPS.",
    )
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--config", default=None, help="default: stored in fnevr checkpoints; vox-256 for published ones")
    p.add_argument("--data", required=True, help="dataset folder with a test/ split")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=16, help="frames per forward pass (default 16)")
    p.add_argument(
        "--max-videos",
        type=positive_int,
        default=None,
        help="evaluate at most this many (readable) videos; unreadable ones are skipped and named",
    )
    p.add_argument(
        "--lpips-weights",
        default=None,
        help="torchvision AlexNet weights for LPIPS (default: the torch hub cache; none: LPIPS skipped)",
    )
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "animate",
        help="drive a source image with a driving video",
        description="Animate SOURCE with the motion of DRIVING: relative keypoint motion with "
        "adapted movement scale (the published demo's reenactment mode).",
    )
    p.add_argument("--source", required=True, type=Path, help="source image (png/jpg, any size)")
    p.add_argument(
        "--driving",
        required=True,
        type=Path,
        help="driving video: mp4/gif/mov, a folder of frames, or a png strip of frames",
    )
    _common(p)
    p.add_argument("--absolute", action="store_true", help="use the driving keypoints as they are (no relative motion)")
    p.add_argument(
        "--find-best-frame",
        action="store_true",
        help="start from the driving frame that best matches the source (needs face-alignment)",
    )
    p.set_defaults(func=cmd_animate)

    p = sub.add_parser(
        "reconstruct",
        help="re-create a video from its first frame",
        description="Self-reenactment: the first frame of VIDEO is the source, every frame drives it "
        "with its own (absolute) keypoints; prints the mean L1 error to the video.",
    )
    p.add_argument("--video", required=True, type=Path, help="video: mp4/gif/mov, a folder of frames, or a png strip")
    _common(p)
    p.set_defaults(func=cmd_reconstruct)
    return parser


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ... (--debug shows all)"


def main(argv=None) -> int:
    """Run one command; returns the exit status (0, 1 at run time, 2 for usage; see the module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    parser = build_parser()
    prog = "fnevr"
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # warnings: one line each
        print(f"{prog}: warning: {_one_line(message)}", file=sys.stderr)

    try:
        args = parser.parse_args([a for a in argv if a != "--debug"])
        prog = f"fnevr {args.command}"
        if not debug:
            warnings.showwarning = show
        if args.command == "train":
            _train_defaults(args)
        args.func(args)
    except CommandError as e:
        if debug:
            raise
        where = e.args[1] if len(e.args) > 1 else prog
        print(f"{where}: error: {_one_line(e.args[0] if e.args else e)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        kind = "" if isinstance(e, (OSError, ValueError, RuntimeError)) else f"{type(e).__name__}: "
        print(f"{prog}: error: {kind}{_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous
    return 0


def _train_defaults(args):
    defaults = dict(DEMO) if args.demo else {"config": "small" if args.config is None else args.config}
    defaults.setdefault("device", "auto")
    if args.checkpoint_activations and args.memory_saving is None:  # checkpointing is part of memory saving
        args.memory_saving = True
    fallback = {
        "steps": None,
        "batch_size": None,
        "checkpoint_every": 500,
        "sample_every": 500,
        "log_every": 10,
        "num_workers": 2,
        "channels_last": "auto",
        "memory_saving": True,
    }
    for key in (
        "config",
        "device",
        "steps",
        "batch_size",
        "checkpoint_every",
        "sample_every",
        "log_every",
        "num_workers",
        "channels_last",
        "memory_saving",
    ):
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key, fallback.get(key)))
    args.demo_out = args.out is None  # the demo's own folder: it starts afresh there
    if args.out is None:
        args.out = Path("runs") / ("demo" if args.demo else "fnevr")
    if args.demo and args.demo_out and not args.resume:
        args.overwrite = True
