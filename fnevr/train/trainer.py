"""The training loop: one process, or many under ``torchrun`` (PyTorch DDP).

Reproducibility: data items draw their randomness from (seed, epoch, index), the sampler from
(seed, epoch) and the TPS transforms from (seed, step), so a run resumed from a checkpoint sees
the same batches and transforms as one that never stopped, and the same sample gets the same
transform whatever the number of processes.
"""

import contextlib
import csv
import math
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from .. import losses as L
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import load_config
from ..data.dataset import DatasetRepeater, FramesDataset
from ..data.synthetic import ensure_synthetic_dataset
from ..device import parse_device
from ..model import FNeVR
from ..model.render import fused_head_choice
from ..nn import recompute
from .losses import DiscriminatorLoss, GeneratorLoss, sliced_tps
from .run_folder import RunFolder, RunFolderError
from .samples import save_sample_grid

PARTS = ("generator", "kp_detector", "discriminator", "pose_editor")
LR_KEYS = {
    "generator": "lr_generator",
    "kp_detector": "lr_kp_detector",
    "discriminator": "lr_discriminator",
    "pose_editor": "lr_face_editor",
}


@dataclass
class TrainOptions:
    """What ``fnevr train`` takes (see ``fnevr train --help``)."""

    config: str | dict = "small"
    data: str | None = None  # FOMM-layout folder; None: the embedded synthetic set
    out: str = "runs/fnevr"
    device: str = "auto"
    steps: int | None = None  # stop after this many optimiser steps (default: the config's epochs)
    batch_size: int | None = None  # global batch (split across processes); default: the config's
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16, fp64
    channels_last: bool | None = None  # default: on CUDA
    compile: bool = False  # torch.compile the generator and keypoint detector
    memory_saving: bool = True  # fused ray MLP + recomputed cheap activations (same results)
    checkpoint_activations: bool = False  # also recompute the decoder and hourglass blocks (less memory, slower)
    accumulate: int = 1  # micro-batches per optimiser step
    num_workers: int = 2
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    resume: bool = False  # continue the run in ``out`` from its newest readable checkpoint
    overwrite: bool = False  # replace the run in ``out`` (without it, and without resume, an error)
    allow_nonfinite: bool = False  # go on after a NaN/inf loss (default: stop, naming the loss term)
    seed: int = 0
    vgg_weights: str | None = None
    perceptual_fallback: str = "l1"
    backend: str | None = None  # fused-op backend; default: the config's
    progress: bool = True

    def validate(self):
        """Raise ``ValueError`` naming the first option out of range (before any work is done)."""

        def positive(name, value, optional=False):
            if (value is None and optional) or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                return
            raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")

        positive("steps", self.steps, optional=True)
        positive("batch_size", self.batch_size, optional=True)
        for name in ("accumulate", "checkpoint_every", "sample_every", "log_every"):
            positive(name, getattr(self, name))
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16", "fp64"):
            raise ValueError(f"precision must be auto, fp32, bf16, fp16 or fp64, got {self.precision!r}")
        if self.checkpoint_activations and (not self.memory_saving or self.compile):
            raise ValueError(
                "checkpoint_activations needs memory_saving and no compile (torch.compile plans its own recomputation)"
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
        parse_device(self.device)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf (training stops unless ``allow_nonfinite``)."""


class Trainer:
    """Builds model, losses, optimisers and data from :class:`TrainOptions`; :meth:`fit` trains.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group (NCCL on CUDA, gloo on CPU),
    converts BatchNorm layers to synchronised ones, wraps both loss modules in DDP, and leaves
    logging, samples and checkpoints to rank 0.
    """

    def __init__(self, opts: TrainOptions):
        opts.validate()
        self.opts = opts
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.out = Path(opts.out)
        self.config = load_config(opts.config)
        self.folder = RunFolder(self.out) if self.is_main else None
        if self.folder is not None:  # checked and locked before anything heavy is built
            self._claim_folder()
            weakref.finalize(self, self.folder.release)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        if self.folder is not None and opts.overwrite and self.folder.holds_run():  # only once all went well
            self.say(f"replacing the earlier run in {self.out} (removed {', '.join(self.folder.clear())})")

    def _claim_folder(self):
        for note in self.folder.acquire():
            self.say(note)
        try:
            if self.folder.holds_run() and not (self.opts.resume or self.opts.overwrite):
                raise RunFolderError(
                    f"{self.out} already holds a training run; pass --resume to continue it "
                    f"or --overwrite to replace it (or choose another --out)"
                )
            if self.opts.resume and not self.folder.resume_candidates():
                raise RunFolderError(
                    f"--resume: no checkpoint to resume from in {self.folder.checkpoints} "
                    f"(looked for latest.pt and step-N.pt)"
                )
            for path in self.folder.remove_partial_files():
                self.say(f"removed {path}, a partial file of an interrupted write")
        except BaseException:
            self.folder.release()
            raise

    def say(self, message: str):
        """A message for the user (rank 0 only), on stderr."""
        if self.is_main:
            print(f"fnevr train: {message}", file=sys.stderr, flush=True)

    def close(self):
        """Release the run folder (also done at the end of :meth:`fit`)."""
        if self.folder is not None:
            self.folder.release()

    def _build(self):
        opts = self.opts
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = parse_device(opts.device)
        if opts.device == "auto" and self.device.type == "cuda":
            self.device = torch.device(f"cuda:{local}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.dataset = self._dataset()  # reads only the folder listing; a bad --data fails here, early
        tp = self.config["train_params"]
        batch = opts.batch_size or tp["batch_size"]
        if batch % (self.world * opts.accumulate):
            raise ValueError(
                f"batch size {batch} must be divisible by processes ({self.world}) x accumulate ({opts.accumulate})"
            )
        self.global_batch, self.micro_batch = batch, batch // (self.world * opts.accumulate)
        precision = opts.precision if opts.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.param_dtype = torch.float64 if precision == "fp64" else torch.float32  # fp64: for exactness checks
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

        # Memory saving (same results; see fnevr.nn.recompute): the fused ray MLP unless the config
        # asks for another head, and recomputed cheap activations, except under torch.compile,
        # which plans its own recomputation.
        render = self.config["model_params"]["generator_params"]["render_params"]
        if opts.memory_saving and fused_head_choice(render.get("fused_head", "none")) == "none":
            render["fused_head"] = "mlp"
        self.recompute = opts.memory_saving and not opts.compile
        torch.manual_seed(opts.seed)
        self.model = FNeVR(self.config)
        if opts.backend:
            self.model.set_backend(opts.backend)
        if self.world > 1:
            self.model = _sync_batchnorm(self.model, self.device)
        # On the CPU too it is faster at vox-256 (FNeVR.channels_last), but with memory saving
        # spade_norm keeps copies of channels_last inputs, so there it is asked for (the demo does).
        self.channels_last = opts.channels_last if opts.channels_last is not None else self.device.type == "cuda"
        self.model.to(self.device, self.param_dtype)
        if self.channels_last:
            self.model.channels_last()
        if opts.compile:
            self.model.generator.compile()
            self.model.kp_detector.compile()
        perceptual = L.PerceptualPyramidLoss(
            tp["scales"],
            tp["loss_weights"]["perceptual"],
            vgg_weights=opts.vgg_weights,
            fallback=opts.perceptual_fallback,
        )
        self.perceptual_mode = perceptual.mode
        self.gen_loss = GeneratorLoss(self.model, tp, perceptual).to(self.device, self.param_dtype)
        self.disc_loss = DiscriminatorLoss(self.model, tp).to(self.device, self.param_dtype)
        self.use_gan = tp["loss_weights"]["generator_gan"] != 0
        self.gen_step, self.disc_step = self.gen_loss, self.disc_loss
        if self.world > 1:  # the generator-side DDP must not own the discriminator (see train_step)
            self.model.discriminator.requires_grad_(False)
            self.gen_step = DDP(self.gen_loss, find_unused_parameters=True)
            self.model.discriminator.requires_grad_(True)
            self.disc_step = DDP(self.disc_loss)
        # fused Adam: one kernel per step for all parameters (CPU and CUDA), not one per tensor
        self.optimizers = {
            p: torch.optim.Adam(getattr(self.model, p).parameters(), lr=tp[LR_KEYS[p]], betas=(0.5, 0.999), fused=True)
            for p in PARTS
        }
        self.schedulers = {
            p: torch.optim.lr_scheduler.MultiStepLR(o, tp.get("epoch_milestones", []), gamma=0.1)
            for p, o in self.optimizers.items()
        }
        self.step = self.epoch = self.epoch_step = 0
        self.resumed_from = None
        if opts.resume:
            self._resume()

    # --- data -----------------------------------------------------------------------------------

    def _dataset(self):
        d = self.config["dataset_params"]
        root = self.opts.data or d.get("root_dir")
        if root is None:
            if self.is_main:
                root = ensure_synthetic_dataset(size=d["frame_shape"][0])
            if self.world > 1:
                dist.barrier()
            root = ensure_synthetic_dataset(size=d["frame_shape"][0])
        ds = FramesDataset(
            root,
            frame_shape=d["frame_shape"],
            is_train=True,
            id_sampling=d.get("id_sampling", False),
            augmentation=d.get("augmentation_params"),
            seed=self.opts.seed,
        )
        return DatasetRepeater(ds, self.config["train_params"].get("num_repeats", 1))

    def _loader(self, skip_batches: int):
        sampler = DistributedSampler(
            self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.opts.seed, drop_last=True
        )
        sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        indices = list(sampler)
        per_step = self.micro_batch * self.opts.accumulate
        indices = indices[: len(indices) // per_step * per_step][skip_batches * per_step :]
        return DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=indices,
            drop_last=True,
            num_workers=self.opts.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def steps_per_epoch(self) -> int:
        per_rank = len(self.dataset) // self.world
        return per_rank // (self.micro_batch * self.opts.accumulate)

    # --- one optimiser step -----------------------------------------------------------------------

    def tps_for_step(self, step: int, offset: int):
        tp = self.config["train_params"]
        g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + step)
        return sliced_tps(
            self.micro_batch, self.global_batch, offset, tp["transform_params"], g, self.device, self.param_dtype
        )

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimiser step over this process's micro-batches; returns the (local) mean losses."""
        self.model.train()
        totals = {}
        amp = dict(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        n = len(micro_batches)
        generated = []
        # The generator's GAN losses go through the discriminator; its gradients from that pass
        # would be discarded (FOMM zeroes them), so it is frozen instead.
        self.model.discriminator.requires_grad_(False)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            offset = (self.rank * n + i) * self.micro_batch
            sync = _no_sync(self.gen_step) if i < n - 1 else contextlib.nullcontext()
            with sync, torch.autocast(**amp), recompute.saving_memory(self.recompute, self.opts.checkpoint_activations):
                losses, out = self.gen_step(batch, self.tps_for_step(self.step, offset))
                loss = sum(losses.values()) / n
            self.scaler.scale(loss).backward()
            generated.append((batch["driving"], out["prediction"].detach()))
            for k, v in losses.items():  # tensors: read once, after the step (one host sync, not one per loss)
                totals[k] = totals.get(k, 0.0) + v.detach() / n
        self.model.discriminator.requires_grad_(True)
        for part in ("generator", "kp_detector", "pose_editor"):
            if any(p.grad is not None for p in getattr(self.model, part).parameters()):
                self.scaler.step(self.optimizers[part])
        if self.use_gan:
            for i, (driving, prediction) in enumerate(generated):
                sync = _no_sync(self.disc_step) if i < n - 1 else contextlib.nullcontext()
                with (
                    sync,
                    torch.autocast(**amp),
                    recompute.saving_memory(self.recompute, self.opts.checkpoint_activations),
                ):
                    d_losses = self.disc_step(driving, prediction)
                    loss = sum(d_losses.values()) / n
                self.scaler.scale(loss).backward()
                for k, v in d_losses.items():
                    totals[k] = totals.get(k, 0.0) + v.detach() / n
            self.scaler.step(self.optimizers["discriminator"])
        self.scaler.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self._last_out = out
        self._last_batch = batch
        values = torch.stack([v.double() for v in totals.values()]).tolist()
        return dict(zip(totals, values))

    def _to_device(self, batch: dict) -> dict:
        fmt = torch.channels_last if self.channels_last else None
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, self.param_dtype if v.is_floating_point() else v.dtype, non_blocking=True)
                if fmt is not None and v.dim() == 4:
                    v = v.contiguous(memory_format=fmt)
            out[k] = v
        return out

    # --- the loop -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``opts.steps`` (or the config's epochs); returns the last logged losses."""
        tp = self.config["train_params"]
        per_epoch = self.steps_per_epoch()
        if per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(self.dataset)} items per epoch, fewer than one step of "
                f"{self.global_batch} (batch) x {self.opts.accumulate} (accumulate)"
            )
        total = self.opts.steps or per_epoch * tp["num_epochs"]
        if self.folder is not None and not self.folder.locked:  # a second fit() of this trainer
            for note in self.folder.acquire():
                self.say(note)
        try:
            return self._fit(total)
        finally:
            self.close()

    def _fit(self, total: int) -> dict:
        logger = _Logger(
            self.out,
            self.is_main,
            asdict(self.opts),
            self.perceptual_mode,
            purge_step=self.step + 1 if self.resumed_from is not None else None,
        )
        bar = None
        lines = self.is_main and self.opts.progress and not sys.stderr.isatty()  # logs, not a terminal
        if self.is_main and self.opts.progress and not lines:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, unit="it", dynamic_ncols=True, file=sys.stderr)
        last, window, tick = {}, [], time.perf_counter()
        while self.step < total:
            loader = self._loader(self.epoch_step)
            micro = []
            for batch in loader:
                micro.append(batch)
                if len(micro) < self.opts.accumulate:
                    continue
                losses, micro = self.train_step(micro), []
                self._check_finite(losses)
                self.epoch_step += 1
                window.append(losses)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {
                            k: f"{v:.3f}"
                            for k, v in losses.items()
                            if k in ("perceptual", "perceptual_l1", "equivariance_value")
                        }
                    )
                if self.step % self.opts.log_every == 0 or self.step == total:
                    now = time.perf_counter()
                    last = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    last["it_per_s"] = len(window) / (now - tick)
                    last["lr"] = self.optimizers["generator"].param_groups[0]["lr"]
                    logger.log(self.step, self.epoch, last)
                    window, tick = [], now
                    if lines:
                        eta = (total - self.step) / max(last["it_per_s"], 1e-9)
                        print(
                            f"step {self.step}/{total} (ETA {eta:.0f} s) "
                            + " ".join(f"{k} {v:.4g}" for k, v in last.items()),
                            file=sys.stderr,
                            flush=True,
                        )
                if self.is_main and (self.step % self.opts.sample_every == 0 or self.step == total):
                    save_sample_grid(
                        self.out / "samples" / f"step-{self.step:07d}.png", self._last_batch, self._last_out
                    )
                if self.step % self.opts.checkpoint_every == 0 or self.step == total:
                    self.save()
                if self.step >= total:
                    break
            if self.step >= total:
                break
            self.epoch += 1
            self.epoch_step = 0
            for s in self.schedulers.values():
                s.step()
        if bar is not None:
            bar.close()
        logger.close()
        return last

    def _check_finite(self, losses: dict):
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        flag = len(bad)
        if self.world > 1:  # every process stops, or none
            t = torch.tensor([flag], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        if not flag:
            return
        terms = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "in another process"
        if self.opts.allow_nonfinite:
            self.say(f"step {self.step}: non-finite loss ({terms}); going on (--allow-nonfinite)")
            return
        first = next(iter(bad), None)
        last = self.folder.resume_candidates()[:1] if self.folder is not None else []
        raise NonFiniteLossError(
            f"step {self.step}: the loss term {first!r} is not finite ({terms}); training stopped, "
            f"nothing of this step was saved (last checkpoint: {last[0][1] if last else 'none'}). Try a lower "
            f"learning rate or --precision fp32, or pass --allow-nonfinite to go on"
        )

    # --- checkpoints ----------------------------------------------------------------------------------

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        state = {
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),  # data and transforms have their own seeded streams
        }
        path = save_checkpoint(
            self.out / "checkpoints" / f"step-{self.step:07d}.pt",
            _plain(self.model),
            step=self.step,
            epoch=self.epoch,
            epoch_step=self.epoch_step,
            training=state,
        )
        save_checkpoint(
            self.out / "checkpoints" / "latest.pt",
            _plain(self.model),
            step=self.step,
            epoch=self.epoch,
            epoch_step=self.epoch_step,
            training=state,
        )
        return path

    def _resume(self):
        """Continue from the newest readable checkpoint: ``latest.pt``, or a ``step-N.pt`` newer than it
        (a crash between the two writes) or, when it cannot be read, the highest readable ``step-N.pt``."""
        folder = self.folder or RunFolder(self.out)
        newest = None  # (step, path, model, extra)
        for file_step, path in folder.resume_candidates():
            if newest is not None and file_step is not None and file_step <= newest[0]:
                break
            try:
                loaded, extra = load_checkpoint(path, self.config, map_location=self.device, training_modules=True)
                step = extra["step"]
                state = extra["training"]
                if not isinstance(step, int) or not isinstance(state, dict):
                    raise ValueError("no training state")
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
                self.say(f"--resume: skipping {path}: {str(e).splitlines()[0]}")
                continue
            if newest is None or step > newest[0]:
                newest = (step, path, loaded, extra)
        if newest is None:
            raise RunFolderError(f"--resume: no readable checkpoint in {folder.checkpoints}")
        step, path, loaded, extra = newest
        _plain(self.model).load_state_dict(loaded.state_dict())
        state = extra["training"]
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step, self.epoch, self.epoch_step = extra["step"], extra["epoch"], extra["epoch_step"]
        self.resumed_from = path
        if self.folder is not None:
            dropped = self.folder.truncate_log(self.step)
            self.say(
                f"resuming from {path} (step {self.step})"
                + (f"; dropped {dropped} log row(s) after it, they are trained again" if dropped else "")
            )


class _Logger:
    """CSV (``log.csv``) and TensorBoard (``tb/``) logs, on rank 0 only."""

    def __init__(self, out: Path, active: bool, options: dict, perceptual_mode: str, purge_step: int | None = None):
        self.active, self.writer, self.file, self.csv = active, None, None, None
        if not active:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "log.csv"
        self.columns = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=purge_step)  # a resume replaces later events
            self.writer.add_text("options", repr(options) + f"\nperceptual loss: {perceptual_mode}")
        except ImportError:  # tensorboard is optional at run time; the CSV log is always written
            self.writer = None

    def log(self, step: int, epoch: int, values: dict):
        if not self.active:
            return
        row = {"step": step, "epoch": epoch, **{k: f"{v:.6g}" for k, v in values.items()}}
        if self.file is None:
            new = not self.path.exists()
            self.file = open(self.path, "a", newline="")  # noqa: SIM115  (kept open; close() closes it)
            self.columns = list(row)
            self.csv = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
            if new:
                self.csv.writeheader()
        self.csv.writerow(row)
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(("loss/" if k not in ("it_per_s", "lr") else "") + k, v, step)

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _sync_batchnorm(model: FNeVR, device: torch.device) -> FNeVR:
    """BatchNorm layers -> synchronised ones: torch's SyncBatchNorm on CUDA, fnevr's (through
    ``fnevr.ops.spade_norm``'s process-group reduction) on CPU, where torch's is not supported."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from ..nn import SyncBatchNorm

    return SyncBatchNorm.convert(model).set_backend(model.backend)


def _plain(model):
    return model.module if isinstance(model, DDP) else model


def _no_sync(module):
    return module.no_sync() if isinstance(module, DDP) else contextlib.nullcontext()
