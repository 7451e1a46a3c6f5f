"""The ``fnevr`` command (also ``python -m fnevr``): animate faces, reconstruct videos, train, evaluate.

Run ``fnevr --help`` or ``fnevr <command> --help``.

Errors are one line on stderr, ``fnevr <command>: error: ...``, with exit code 2 for a usage
mistake (an argument out of range, a path that is missing or of the wrong kind), found before any
heavy work, and 1 for a failure at run time (an unreadable file, a run folder in use, a diverging
run). ``--debug`` shows the traceback instead. Output videos are written to a temporary name and
renamed once complete.
"""

import argparse
import importlib.util
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
  export        write a checkpoint's networks as ONNX graphs and/or AOTInductor packages

Checkpoints: the authors' published ones (config vox-256) or fnevr's own (config stored inside).
Errors: one line, exit code 2 for usage, 1 at run time; --debug shows the traceback.
"""

VIDEO_OUT_SUFFIXES = (".mp4", ".mov", ".gif")


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
        raise UsageError(f"--out {path}: expected a video file name ending in {', '.join(VIDEO_OUT_SUFFIXES)}")
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


def _read_source(args):
    """The source image, RGB ``uint8`` ``[H, W, 3]`` at its own size: an image, or frame
    ``--source-frame`` of a video."""
    from .data.video import MOVIE_SUFFIXES, VideoReadError, iter_video, read_image

    path, index = args.source, args.source_frame
    try:
        if path.is_dir() or (path.suffix.lower() in MOVIE_SUFFIXES):
            for i, frame in enumerate(iter_video(path)):
                if i == index:
                    return frame.numpy()
            raise CommandError(f"--source-frame {index}: {path} has {i + 1} frame{'s' if i else ''}")
        if index:
            raise CommandError(f"--source-frame {index}: {path} is an image (one frame); give a video")
        return read_image(path)[0].numpy()
    except VideoReadError as e:
        raise CommandError(f"source: {e}") from e


def _common(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, type=Path, help="published or fnevr checkpoint (.pth/.pt)")
    p.add_argument(
        "--config",
        default=None,
        help="bundled config name (vox-256, small) or YAML path (default: the one stored in fnevr "
        "checkpoints; vox-256 for the authors' published ones)",
    )
    p.add_argument("--out", required=True, type=Path, help="output video (.mp4, .mov or .gif)")
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
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="write source | driving | result side by side, as the model sees them",
    )
    g = p.add_argument_group("faces (without --crop, whole frames are animated, letterboxed: never stretched)")
    g.add_argument(
        "--crop",
        action="store_true",
        help="find the face (OpenCV's Haar cascade) in the source and in every driving frame, and animate "
        "a square crop around it; writes the animated crop",
    )
    g.add_argument(
        "--paste-back",
        action="store_true",
        help="with the crop (implied), paste the animated face into the full-size source, feathered",
    )
    g.add_argument(
        "--crop-scale", type=positive_float, default=2.0, help="crop side over the detected face's (default 2)"
    )
    g.add_argument(
        "--smoothing",
        type=_fraction,
        default=0.5,
        help="weight of the past in the driving crop box's moving average, in [0, 1) (default 0.5)",
    )
    g.add_argument(
        "--no-face",
        choices=["full-frame", "stop"],
        default="full-frame",
        help="full-frame (default): a source without a face is used whole, a driving frame without one "
        "keeps the last box; stop: stop with an error naming the file and frame",
    )
    g.add_argument(
        "--feather",
        type=_fraction,
        default=0.1,
        help="paste-back: the blended border, as a fraction of the crop's side (default 0.1)",
    )
    g.add_argument("--face-cascade", type=Path, default=None, help="an OpenCV Haar cascade file to detect with")
    g = p.add_argument_group("output")
    g.add_argument("--fps", type=positive_float, default=None, help="output frame rate (default: the driving video's)")
    g.add_argument("--crf", type=_crf, default=23, help="H.264 quality, 0 (lossless) to 51 (default 23)")
    g.add_argument("--no-audio", action="store_true", help="leave out the driving video's audio (kept by default)")


def _fraction(text):
    value = _number(float, 0.0, False, "a number in [0, 1)")(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _crf(text):
    value = _number(int, 0, False, "an integer from 0 to 51")(text)
    if value > 51:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 51, got {text!r}")
    return value


def _detector(args):
    """The face detector, built before any heavy work (a missing OpenCV or a bad cascade is a usage error)."""
    args.crop = args.crop or args.paste_back
    if args.side_by_side and args.paste_back:
        raise UsageError("--side-by-side shows the model's squares; it does not go with --paste-back")
    if not args.crop:
        if args.face_cascade is not None:
            raise UsageError("--face-cascade goes with --crop or --paste-back")
        return None
    from .face import HaarFaceDetector

    if args.face_cascade is not None:
        _existing_file(args.face_cascade, "--face-cascade")
    try:
        return HaarFaceDetector(args.face_cascade)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise UsageError(f"--crop: {e}") from None


def _run(args, device, source, driving: Path, *, relative: bool, source_name: str) -> dict:
    """Animate ``source`` (RGB uint8 ``[H, W, 3]``) with the frames of ``driving``; write ``--out``."""
    from tqdm import tqdm

    from .animator import Animator
    from .data.video import VideoReadError, VideoWriter, frame_rate, has_audio, iter_video
    from .face import NoFaceError, describe_missing

    animator = Animator(
        args.checkpoint,
        config=args.config,
        backend=args.backend,
        device=device,
        crop=args.crop,
        paste_back=args.paste_back,
        detector=args.detector,
        crop_scale=args.crop_scale,
        smoothing=args.smoothing,
        no_face=args.no_face,
        feather=args.feather,
        relative=relative,
        adapt_movement_scale=relative,
        precision=args.precision,
        source_name=source_name,
        driving_name=str(driving),
    )
    in_fps = frame_rate(driving)
    fps = args.fps if args.fps is not None else in_fps
    audio = None
    if not args.no_audio and has_audio(driving):
        if fps == in_fps:
            audio = driving
        else:
            warnings.warn(
                f"the audio is left out: --fps {fps:g} differs from the driving video's {in_fps:g} fps", stacklevel=2
            )
    stats = {"frames": 0, "l1": 0.0, "audio": audio is not None}
    try:
        animator.set_source(source)
        squares = [] if args.find_best_frame else None
        prepared = (animator.prepare(frame) for frame in iter_video(driving))
        if squares is not None:  # the best-frame search needs every driving square first
            from .animate import find_best_frame

            squares = list(prepared)
            best = find_best_frame(animator.source.cpu(), torch.stack(squares), device=str(device))
            animator.set_initial(squares[best])
            prepared = iter(squares)
        seen: list = []

        def keep(iterable):  # the squares, kept until their output is written (side by side, L1)
            for square in iterable:
                seen.append(square)
                yield square

        bar = tqdm(unit="frame", desc=args.command, disable=not sys.stderr.isatty())
        with bar, VideoWriter(args.out, fps, crf=args.crf, audio=audio) as writer:
            for pred in animator.animate_squares(keep(prepared), args.batch_size, progress=bar.update):
                square = seen.pop(0)
                stats["l1"] += (pred - square).abs().mean().item()
                stats["frames"] += 1
                if args.side_by_side:
                    from .face import to_uint8

                    writer.write(to_uint8(torch.cat([animator.source.cpu(), square, pred], dim=2)))
                else:
                    writer.write(animator.finish(pred))
    except (NoFaceError, VideoReadError) as e:
        raise CommandError(str(e)) from e
    stats["audio"] = stats["audio"] and writer.audio_kept
    if animator.tracker.missing:
        message = describe_missing(str(driving), animator.tracker.missing, stats["frames"])
        warnings.warn(message + ": each kept the last box found (letterboxed before the first)", stacklevel=2)
    return stats


def _check_inference(args, *inputs):
    """animate/reconstruct: every path and option, before the model is loaded."""
    device = _device(args.device)
    _existing_file(args.checkpoint, "--checkpoint")
    if args.config is not None:
        _config(args.config)
    for option, path in inputs:
        _existing(path, option)
    _video_out(args.out)
    args.detector = _detector(args)
    return device


def _report(args, stats, extra=""):
    audio = ", with the driving video's audio" if stats["audio"] else ""
    print(f"wrote {args.out} ({stats['frames']} frames{audio}){extra}")


def cmd_animate(args):
    device = _check_inference(args, ("--source", args.source), ("--driving", args.driving))
    source = _read_source(args)
    stats = _run(args, device, source, args.driving, relative=not args.absolute, source_name=str(args.source))
    _report(args, stats)


def cmd_reconstruct(args):
    device = _check_inference(args, ("--video", args.video))
    args.source, args.source_frame, args.find_best_frame = args.video, 0, False
    source = _read_source(args)
    stats = _run(args, device, source, args.video, relative=False, source_name=f"{args.video} frame 0")
    _report(args, stats, "" if args.side_by_side else f"; L1 to the video: {stats['l1'] / stats['frames']:.4f}")


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
    for option, path in (("--landmark-model", args.landmark_model), ("--identity-weights", args.identity_weights)):
        if path is not None:
            _existing_file(path, option)
    if args.save_png is not None and args.save_png.exists() and not args.save_png.is_dir():
        raise UsageError(f"--save-png {args.save_png} is a file; expected a folder")
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
            landmark_model=args.landmark_model,
            identity_weights=args.identity_weights,
            save_png=args.save_png,
            progress=bar.update,
        )
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


def cmd_export(args):
    from . import export

    if args.onnx is None and args.aoti is None:
        raise UsageError("nothing to write: give --onnx DIR, --aoti DIR or both")
    device = _device(args.device)
    _existing_file(args.checkpoint, "--checkpoint")
    if args.config is not None:
        _config(args.config)
    if args.opset < 16:
        raise UsageError(f"--opset must be at least 16 (the first with GridSample), got {args.opset}")
    for module in ("onnx", "onnxscript") if args.onnx is not None else ():
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"--onnx needs the {module} package: pip install 'fnevr[onnx]'")
    targets: list[Path] = []
    for option, folder, suffix in (("--onnx", args.onnx, "onnx"), ("--aoti", args.aoti, "pt2")):
        if folder is not None:
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"{option} {folder} is a file; expected a folder for {' and '.join(export.PARTS)}")
            targets += [folder / f"{part}.{suffix}" for part in export.PARTS]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; --overwrite replaces")
    from .checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint, args.config, training_modules=False)  # on the CPU
    model.set_backend(args.backend or "auto")
    if args.onnx is not None:  # ONNX graphs hold no device: traced on the CPU
        checked = "checked with ONNX Runtime" if importlib.util.find_spec("onnxruntime") else "onnxruntime: unchecked"
        for path in export.export_onnx(model, args.onnx, opset=args.opset).values():
            print(f"wrote {path} (opset {args.opset}; {checked})")
    if args.aoti is not None:
        for path in export.export_aoti(model.to(device), args.aoti).values():
            print(f"wrote {path} (AOTInductor package for {device.type})")


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
        description="Re-create every test video from its first frame and report mean L1, PSNR, SSIM; "
        "LPIPS given AlexNet weights; AKD and AED given landmark and identity models (FOMM's protocol: "
        "on the frames rounded to 8 bits, as png).",
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
    p.add_argument(
        "--landmark-model",
        type=Path,
        default=None,
        help="AKD: a 68-point landmark model saved by torch.export.save or torch.jit.save (images "
        "[N,3,H,W] in [0,1] -> [N,68,2] pixels, NaN without a face); default: face-alignment, if installed "
        "with its weights in the torch hub cache; else AKD is left out",
    )
    p.add_argument(
        "--identity-weights",
        type=Path,
        default=None,
        help="AED: an identity-embedding model saved by torch.export.save or torch.jit.save (images "
        "[N,3,H,W] in [0,1] -> [N,D]); without it AED is left out",
    )
    p.add_argument(
        "--save-png", type=Path, default=None, help="also write each reconstruction as a png strip (FOMM's layout)"
    )
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "animate",
        help="drive a source image with a driving video",
        description="Animate SOURCE with the motion of DRIVING: relative keypoint motion with "
        "adapted movement scale (the published demo's reenactment mode).",
    )
    p.add_argument("--source", required=True, type=Path, help="source image (png/jpg, any size), or a video")
    p.add_argument(
        "--source-frame", type=count, default=0, help="with a video as --source: the frame to animate (default 0)"
    )
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

    p = sub.add_parser(
        "export",
        help="write the networks as ONNX graphs or AOTInductor packages",
        description="Export a checkpoint's keypoint detector and generator (eval mode, fp32, dynamic batch, "
        "the config's frame size): --onnx writes DIR/kp_detector.onnx and DIR/generator.onnx on standard ONNX "
        "ops, each checked against PyTorch with ONNX Runtime when it is installed; --aoti compiles each into an "
        "AOTInductor package (DIR/kp_detector.pt2, DIR/generator.pt2) for --device. fnevr/export.py lists the "
        "graphs' inputs and outputs.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="published or fnevr checkpoint (.pth/.pt)")
    p.add_argument("--config", default=None, help="default: stored in fnevr checkpoints; vox-256 for published ones")
    p.add_argument("--onnx", type=Path, default=None, help="folder for kp_detector.onnx and generator.onnx")
    p.add_argument("--aoti", type=Path, default=None, help="folder for kp_detector.pt2 and generator.pt2 (AOTInductor)")
    p.add_argument("--opset", type=positive_int, default=20, help="ONNX opset, 16 or newer (default 20)")
    p.add_argument("--device", default="cpu", help="device the AOTInductor package runs on: cpu (default) or cuda")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help="fused-op backend inside the programs")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    p.set_defaults(func=cmd_export)
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
