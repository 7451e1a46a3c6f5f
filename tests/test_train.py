"""Training: a step on every backend, the loss falls, resume continues exactly, DDP over two gloo
processes equals one process on the combined batch, the demo command, evaluation."""

import copy
import csv
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fnevr.config import load_config
from fnevr.data.synthetic import ensure_synthetic_dataset
from fnevr.train import Trainer, TrainOptions
from helpers import target_params


def tiny_config():
    """The small config at 32x32: a training step takes a fraction of a second here."""
    config = load_config("small")
    config["dataset_params"]["frame_shape"] = [32, 32, 3]
    config["train_params"]["batch_size"] = 4
    config["model_params"]["discriminator_params"]["num_blocks"] = 3  # 4 blocks need 64x64 images
    return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "synthetic",
        size=32,
        num_frames=8,
        num_train=8,
        num_test=2,
        clips_per_id=2,
        seed=1,
    )


def options(data, out, **kw):
    base = dict(
        config=tiny_config(),
        data=str(data),
        out=str(out),
        device="cpu",
        num_workers=0,
        progress=False,
        checkpoint_every=1000,
        sample_every=1000,
        log_every=1,
    )
    base.update(kw)
    return TrainOptions(**base)


def read_log(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "backend, device",
    target_params([("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]),
)
def test_a_training_step_on_every_backend(data, tmp_path, backend, device):
    """On CUDA as training runs there: bf16 autocast and channels_last (the defaults)."""
    trainer = Trainer(options(data, tmp_path, backend=backend, device=device))
    assert trainer.amp_dtype == (torch.bfloat16 if device == "cuda" else None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = next(iter(trainer._loader(0)))
    losses = trainer.train_step([batch])
    assert {
        "perceptual",
        "perceptual_l1",
        "generator_gan",
        "feature_matching",
        "equivariance_value",
        "equivariance_jacobian",
        "pose_edit",
        "discriminator_gan",
    } <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    after = trainer.model.state_dict()
    for part in ("generator.", "kp_detector.", "discriminator.", "pose_editor."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), f"{part} did not change"


def test_bf16_training_step(data, tmp_path):
    trainer = Trainer(options(data, tmp_path, precision="bf16"))
    assert trainer.amp_dtype == torch.bfloat16
    losses = trainer.train_step([next(iter(trainer._loader(0)))])
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_channels_last_training_step_matches_the_default_layout(data, tmp_path):
    """channels_last (CUDA's default, the demo's on CPU) converts the 2-D convolution weights only (the
    ray sampler's 3-D ones cannot be) and gives the same step."""
    steps = []
    for layout in (False, True):
        trainer = Trainer(options(data, tmp_path / str(layout), channels_last=layout))
        weights = [p for p in trainer.model.parameters() if p.dim() == 4]
        assert all(
            p.is_contiguous(memory_format=torch.channels_last) == layout
            for p in weights
            if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1
        )
        steps.append(trainer.train_step([next(iter(trainer._loader(0)))]))
    for k in steps[0]:
        assert steps[1][k] == pytest.approx(steps[0][k], rel=1e-4, abs=1e-6), k


def test_loss_falls_and_outputs_are_written(data, tmp_path):
    trainer = Trainer(options(data, tmp_path, steps=30, checkpoint_every=30, sample_every=15))
    trainer.fit()
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    first = sum(float(r["perceptual"]) for r in rows[:5]) / 5
    last = sum(float(r["perceptual"]) for r in rows[-5:]) / 5
    assert last < 0.9 * first, f"reconstruction loss did not fall: {first:.3f} -> {last:.3f}"
    assert (tmp_path / "checkpoints" / "latest.pt").is_file() and (
        tmp_path / "checkpoints" / "step-0000030.pt"
    ).is_file()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000015.png", "step-0000030.png"]
    assert any((tmp_path / "tb").iterdir())


def test_resume_continues_exactly(data, tmp_path):
    straight = Trainer(options(data, tmp_path / "a", steps=6))
    straight.fit()
    first = Trainer(options(data, tmp_path / "b", steps=3, checkpoint_every=3))
    first.fit()
    resumed = Trainer(options(data, tmp_path / "b", steps=6, resume=True))
    assert resumed.step == 3
    resumed.fit()
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in b] == ["1", "2", "3", "4", "5", "6"]
    for ra, rb in zip(a, b):
        for key in ("perceptual", "equivariance_jacobian", "discriminator_gan"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_without_checkpoint_says_where_it_looked(data, tmp_path):
    from fnevr.train.run_folder import RunFolderError

    with pytest.raises(RunFolderError, match=r"no checkpoint to resume from in .*checkpoints"):
        Trainer(options(data, tmp_path / "run", resume=True))
    assert not (tmp_path / "run").exists()  # nothing left behind


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("steps", -5),
        ("batch_size", 0),
        ("accumulate", 0),
        ("log_every", 0),
        ("num_workers", -1),
        ("device", "tpu"),
        ("precision", "fp8"),
    ],
)
def test_options_out_of_range_are_refused_before_any_work(data, tmp_path, field, value):
    with pytest.raises(ValueError, match=field if field != "precision" else "precision"):
        Trainer(options(data, tmp_path / "run", **{field: value}))
    assert not (tmp_path / "run").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sgd(trainer):
    """Plain SGD, so parameter changes are proportional to the gradients (Adam's first step is
    lr * sign(grad), which turns round-off in near-zero gradients into differences of 2 lr)."""
    for part in trainer.optimizers:
        trainer.optimizers[part] = torch.optim.SGD(getattr(trainer.model, part).parameters(), lr=0.1)
    return trainer


def _ddp_worker(rank, world, port, data, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    trainer = _sgd(Trainer(options(data, out, seed=3, precision="fp64")))
    batch = torch.load(out / "batch.pt")
    local = {k: v[rank * 2 : (rank + 1) * 2] for k, v in batch.items()}
    trainer.train_step([local])
    if rank == 0:
        torch.save(trainer.model.state_dict(), out / "state.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_on_the_combined_batch(data, tmp_path):
    """SyncBatchNorm statistics, gradient all-reduce and per-sample TPS transforms make one step
    over 2 processes x 2 samples equal to one step over the 4 samples in one process. In fp64:
    at random init some channels are nearly constant, and their instance norm amplifies fp32
    round-off from the different reduction orders to percent-level gradient differences."""
    single = _sgd(Trainer(options(data, tmp_path / "single", seed=3, precision="fp64")))
    before = {k: v.clone() for k, v in single.model.state_dict().items()}
    batch = next(iter(single._loader(0)))
    assert batch["source"].shape[0] == 4 and "pose" in batch
    (tmp_path / "ddp").mkdir()
    torch.save(batch, tmp_path / "ddp" / "batch.pt")
    single.train_step([batch])
    mp.start_processes(_ddp_worker, args=(2, _free_port(), data, tmp_path / "ddp"), nprocs=2, start_method="spawn")
    state, want = torch.load(tmp_path / "ddp" / "state.pt"), single.model.state_dict()
    assert state.keys() == want.keys()
    diffs = {
        k: (state[k].double() - want[k].double()).abs().max().item() for k in state if state[k].is_floating_point()
    }
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-9, f"{worst} differs by {diffs[worst]:.3g}"
    changed = [k for k in want if want[k].is_floating_point() and not torch.equal(want[k], before[k])]
    assert any(k.startswith("kp_detector.") for k in changed) and any("running_var" in k for k in changed)


def test_demo_command_runs_twice_starting_afresh(tmp_path, monkeypatch, capsys):
    """`make demo` twice: the second run says it starts afresh and replaces the first."""
    from fnevr.cli import main

    monkeypatch.setenv("FNEVR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for steps in ("2", "1"):
        assert main(["train", "--demo", "--steps", steps, "--num-workers", "0"]) == 0
        out, err = capsys.readouterr()
        assert f"done: step {steps}" in out and "the demo starts afresh in runs/demo" in err
    assert "replacing the earlier run in runs/demo" in err
    assert [r["step"] for r in read_log(tmp_path / "runs" / "demo")] == ["1"]
    assert torch.load(tmp_path / "runs" / "demo" / "checkpoints" / "latest.pt", weights_only=True)["step"] == 1


def test_evaluate_reports_metrics(data, tmp_path):
    from fnevr.train.evaluate import evaluate

    trainer = Trainer(options(data, tmp_path, steps=1, checkpoint_every=1))
    trainer.fit()
    result = evaluate(tmp_path / "checkpoints" / "latest.pt", data)
    assert result["videos"] == 2 and result["frames"] == 16
    assert 0 < result["l1"] < 1 and result["psnr"] > 0 and -1 <= result["ssim"] <= 1


@pytest.mark.parametrize("bn", [torch.nn.BatchNorm2d, torch.nn.BatchNorm3d])
def test_sync_batchnorm_is_batchnorm_in_one_process(bn):
    from fnevr.nn import SyncBatchNorm

    torch.manual_seed(0)
    plain = bn(5, momentum=None)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.normal_()
    synced = SyncBatchNorm.convert(torch.nn.Sequential(copy.deepcopy(plain)))[0]
    assert isinstance(synced, SyncBatchNorm)
    x = (
        torch.randn(3, 5, 4, 6, 7, dtype=torch.float64)[:, :, 0]
        if bn is torch.nn.BatchNorm2d
        else torch.randn(3, 5, 4, 6, 7, dtype=torch.float64)
    )
    plain.double(), synced.double()
    for train in (True, True, False):
        outs = []
        for m in (plain, synced):
            m.train(train)
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            outs.append((y, xi.grad, m.weight.grad.clone(), m.running_var.clone()))
            m.weight.grad = m.bias.grad = None
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
