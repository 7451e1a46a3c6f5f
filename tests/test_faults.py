"""Faults: training processes killed mid-write and between steps, corrupt checkpoints, two trainings
into one folder, stale locks, unreadable evaluation videos, non-finite losses, and every CLI
mistake. Nothing may be lost or mixed, and every mistake is one line with the right exit code.

Trainings run as `fnevr train` subprocesses (one thread each, so runs are bit-for-bit repeatable) on
a 32x32 config; a kill is a SIGKILL the process sends itself from inside `torch.save` (after
writing half the bytes) or after an optimiser step, chosen per case from a seeded draw.
"""

import csv
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from fnevr.checkpoint import save_checkpoint
from fnevr.cli import main
from fnevr.config import load_config
from fnevr.data.synthetic import ensure_synthetic_dataset
from fnevr.data.video import write_video
from fnevr.model import FNeVR

STEPS, EVERY = 6, 2

# Runs `fnevr train` with a fault armed: KILL_SAVE=n kills the n-th torch.save half-way through its
# file, KILL_STEP=n kills after the n-th optimiser step, WAIT_FOR=path holds the first step until
# that file exists.
RUNNER = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import fnevr.checkpoint
    from fnevr.train import Trainer
    from fnevr.cli import main

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    saves = 0
    real_save = torch.save
    def save(obj, f, *a, **k):
        global saves
        saves += 1
        if saves == int(os.environ.get("KILL_SAVE", 0)):
            import io
            buf = io.BytesIO()
            real_save(obj, buf)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            die()
        return real_save(obj, f, *a, **k)
    fnevr.checkpoint.torch.save = save

    real_step = Trainer.train_step
    def step(self, batches):
        out = real_step(self, batches)
        while not os.path.exists(os.environ.get("WAIT_FOR", "/")):
            time.sleep(0.05)
        if self.step == int(os.environ.get("KILL_STEP", 0)):
            die()
        return out
    Trainer.train_step = step
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = ensure_synthetic_dataset(
        root / "data", size=32, num_frames=6, num_train=4, num_test=2, clips_per_id=2, seed=2
    )
    config = load_config("small")
    config["dataset_params"]["frame_shape"] = [32, 32, 3]
    config["train_params"]["batch_size"] = 2
    config["model_params"]["discriminator_params"]["num_blocks"] = 3
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    (root / "runner.py").write_text(RUNNER)
    return root, data


def train(setup, out, *extra, steps=STEPS, env=None, wait=True):
    root, data = setup
    argv = [
        sys.executable,
        str(root / "runner.py"),
        "train",
        "--config",
        str(root / "tiny.yaml"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(EVERY),
        "--sample-every",
        "1000",
        "--log-every",
        "1",
        *extra,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out_text, err = proc.communicate(timeout=600)
    return proc.returncode, out_text, err


def params(out):
    return torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["model"]


def log_steps(out):
    lines = (out / "log.csv").read_text().splitlines()
    return [int(line.split(",")[0]) for line in lines[1:]]


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """The uninterrupted run every faulty one must end up equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    code, _, err = train(setup, out)
    assert code == 0, err
    return params(out), (out / "log.csv").read_text()


def assert_same_run(out, straight):
    """Same parameters, and a log with one row per step and the same losses (not the same timings)."""
    want, log = straight
    got = params(out)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rows, want_rows = _rows((out / "log.csv").read_text()), _rows(log)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)]
    for r, w in zip(rows, want_rows):
        assert {k: v for k, v in r.items() if k != "it_per_s"} == {k: v for k, v in w.items() if k != "it_per_s"}
    assert not list(out.rglob(".*.tmp*")) and not (out / ".lock").exists()


def _rows(text):
    return list(csv.DictReader(text.splitlines()))


# Each optimiser step is followed by a checkpoint every EVERY steps: two saves (step-N.pt, latest.pt).
KILLS = {  # name: (fault, the checkpoint the resume must start from, None: none is complete)
    "first-latest-write": ({"KILL_SAVE": "2"}, "step-0000002.pt (step 2)"),  # the first latest.pt cut short
    "first-step-write": ({"KILL_SAVE": "1"}, None),
    "later-step-write": ({"KILL_SAVE": "3"}, "latest.pt (step 2)"),  # step-4.pt cut short
    "later-latest-write": ({"KILL_SAVE": "4"}, "step-0000004.pt (step 4)"),  # newer than latest.pt
    "between-steps": ({"KILL_STEP": "5"}, "latest.pt (step 4)"),  # log rows 1-5 written, 5 is trained again
}
_draw = random.Random(13)
_save = _draw.randint(1, 2 * STEPS // EVERY)
_step = _draw.randint(1, STEPS - 1)
KILLS[f"random-save-{_save}"] = ({"KILL_SAVE": str(_save)}, None if _save == 1 else "")
KILLS[f"random-step-{_step}"] = ({"KILL_STEP": str(_step)}, None if _step < EVERY else "")


@pytest.mark.parametrize("fault", list(KILLS))
def test_killed_training_resumes_to_the_same_parameters(setup, straight, tmp_path, fault):
    out = tmp_path / "run"
    env, source = KILLS[fault]
    code, _, err = train(setup, out, env=env)
    assert code == -9, err
    code, _, err = train(setup, out, "--resume")
    if source is None:  # killed before its first checkpoint was complete: nothing to resume, start again
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "no checkpoint to resume from" in errors[0], err
        assert "removed a stale lock" in err  # the killed process's
        code, _, err = train(setup, out, "--overwrite")
        assert code == 0 and "replacing the earlier run" in err, err
    else:
        assert code == 0 and f"resuming from {out / 'checkpoints'}/{source}" in err, err
    assert_same_run(out, straight)


def corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("broken", [("latest.pt",), ("latest.pt", "step-0000004.pt")])
def test_resume_skips_corrupt_checkpoints_and_says_which(setup, straight, tmp_path, broken):
    out = tmp_path / "run"
    assert train(setup, out, steps=4)[0] == 0
    for name in broken:
        corrupt(out / "checkpoints" / name)
    code, _, err = train(setup, out, "--resume")
    assert code == 0, err
    for name in broken:
        assert f"skipping {out / 'checkpoints' / name}" in err
    step = 4 if len(broken) == 1 else 2
    assert f"resuming from {out / 'checkpoints' / f'step-{step:07d}.pt'} (step {step})" in err
    assert_same_run(out, straight)


def test_a_second_training_into_a_busy_folder_is_refused(setup, tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    first = train(setup, out, steps=4, env={"WAIT_FOR": str(go)}, wait=False)  # holds after its first step
    deadline = time.monotonic() + 300
    while not (out / ".lock").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    code, _, err = train(setup, out, "--overwrite")
    assert code == 1 and len(err.splitlines()) == 1 and f"is in use: process {first.pid}" in err, err
    go.touch()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert log_steps(out) == [1, 2, 3, 4]
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["step"] == 4
    # The finished run is not overwritten unasked either.
    before = (out / "checkpoints" / "latest.pt").read_bytes()
    code, _, err = train(setup, out, steps=2)
    assert code == 1 and "already holds a training run" in err and len(err.splitlines()) == 1, err
    assert (out / "checkpoints" / "latest.pt").read_bytes() == before and log_steps(out) == [1, 2, 3, 4]


def test_stale_lock_is_removed(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".latest.abc.tmp.pt").write_bytes(b"partial")
    code, _, err = train(setup, out, "--overwrite", steps=2)
    assert code == 0, err
    assert "stale lock" in err and not (out / ".lock").exists() and not list(out.rglob(".*.tmp*"))
    assert log_steps(out) == [1, 2]


def test_overwrite_starts_afresh(setup, tmp_path):
    out = tmp_path / "run"
    assert train(setup, out, steps=4)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = train(setup, out, "--overwrite", steps=2)
    assert code == 0 and "replacing the earlier run" in err, err
    assert log_steps(out) == [1, 2] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.pt", "step-0000002.pt"]


def test_nonfinite_loss_stops_training_naming_the_term(setup, tmp_path, monkeypatch, capsys):
    from fnevr.train import Trainer, TrainOptions
    from fnevr.train.trainer import NonFiniteLossError

    root, data = setup
    opts = dict(
        config=str(root / "tiny.yaml"),
        data=str(data),
        device="cpu",
        num_workers=0,
        progress=False,
        steps=3,
        checkpoint_every=1,
        sample_every=100,
        log_every=1,
    )
    real = Trainer.train_step

    def poisoned(self, batches):
        losses = real(self, batches)
        if self.step == 2:
            losses["equivariance_value"] = math.nan
        return losses

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    trainer = Trainer(TrainOptions(out=str(tmp_path / "a"), **opts))
    with pytest.raises(NonFiniteLossError, match=r"step 2: the loss term 'equivariance_value' is not finite"):
        trainer.fit()
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.startswith("step")] == [
        "step-0000001.pt"
    ]  # nothing of the bad step saved
    assert not (tmp_path / "a" / ".lock").exists()
    Trainer(TrainOptions(out=str(tmp_path / "b"), allow_nonfinite=True, **opts)).fit()
    assert "going on (--allow-nonfinite)" in capsys.readouterr().err
    assert log_steps(tmp_path / "b") == [1, 2, 3]


def test_evaluate_skips_and_names_unreadable_videos(tmp_path, capsys):
    from fnevr.train.evaluate import evaluate

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", FNeVR("small", training_modules=False))
    g = torch.Generator().manual_seed(0)
    (tmp_path / "d" / "train").mkdir(parents=True)
    for name in ("a", "b"):
        write_video(
            tmp_path / "d" / "test" / f"{name}.mp4",
            torch.randint(0, 256, (3, 64, 64, 3), generator=g, dtype=torch.uint8),
        )
    alone = {n: evaluate(tmp_path / "m.pt", _only(tmp_path, n)) for n in ("a", "b")}
    data = (tmp_path / "d" / "test" / "a.mp4").read_bytes()
    (tmp_path / "d" / "test" / "0-cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="0-cut.mp4"):
        result = evaluate(tmp_path / "m.pt", tmp_path / "d")
    assert result["videos"] == 2 and result["skipped"] == 1 and result["frames"] == 6
    assert result["l1"] == pytest.approx((alone["a"]["l1"] + alone["b"]["l1"]) / 2, rel=1e-6)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d")]) == 0
    out, err = capsys.readouterr()
    assert "videos=2 skipped=1" in out
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("fnevr evaluate: warning: skipped: cannot read video")
    assert "0-cut.mp4" in warned[0] and "error" not in err


def _only(tmp_path, name):
    folder = tmp_path / f"only-{name}"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    (folder / "test" / f"{name}.mp4").write_bytes((tmp_path / "d" / "test" / f"{name}.mp4").read_bytes())
    return folder


# --- CLI mistakes: one line, the right exit code, nothing written ------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-faults")
    torch.manual_seed(0)
    save_checkpoint(root / "small.pt", FNeVR("small", training_modules=False))
    torch.save({"generator": [1, 2], "kp_detector": {}}, root / "listgen.pt")
    frames = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    write_video(root / "driving.mp4", frames)
    import imageio.v3 as iio

    iio.imwrite(root / "source.png", frames[0].numpy())
    (root / "broken.png").write_bytes(b"not a png")
    (root / "broken.mp4").write_bytes(b"not a movie")
    (root / "frameless").mkdir()
    (root / "notes.txt").write_text("not weights")
    (root / "a-file").write_text("")
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "test").mkdir()
    (root / "nosplit").mkdir()
    ensure_synthetic_dataset(root / "data", size=32, num_frames=4, num_train=2, num_test=1, clips_per_id=1)
    return root


def _cases(r):
    an = [
        "animate",
        "--source",
        str(r / "source.png"),
        "--driving",
        str(r / "driving.mp4"),
        "--checkpoint",
        str(r / "small.pt"),
        "--device",
        "cpu",
    ]
    out = ["--out", str(r / "new" / "o.mp4")]
    tr = ["train", "--out", str(r / "new"), "--data", str(r / "data"), "--steps", "1", "--device", "cpu"]
    ev = ["evaluate", "--checkpoint", str(r / "small.pt"), "--data", str(r / "empty"), "--device", "cpu"]
    return [
        # (argv, exit code, what the message must name)
        (["animate", "--source", str(r / "broken.png"), *an[3:], *out], 1, "broken.png"),
        ([*an[:3], "--driving", str(r / "broken.mp4"), *an[5:], *out], 1, "broken.mp4"),
        ([*an[:3], "--driving", str(r / "missing.mp4"), *an[5:], *out], 2, "missing.mp4"),
        (["reconstruct", "--video", str(r / "frameless"), *an[5:], *out], 1, "frameless"),
        ([*an[:5], "--checkpoint", str(r / "none.pt"), *out], 2, "none.pt: no such file"),
        ([*an[:5], "--checkpoint", str(r), *out], 2, "is a folder"),
        ([*an[:5], "--checkpoint", str(r / "listgen.pt"), *out], 1, "'generator' entry is a list"),
        ([*an, "--out", str(r / "frameless")], 2, "expected a video file name"),
        ([*an, "--out", str(r / "new" / "noext")], 2, "ending in .mp4"),
        ([*an, "--out", str(r / "a-file" / "o.mp4")], 2, "is a file, not a folder"),
        ([*an, *out, "--fps", "0"], 2, "--fps"),
        ([*an, *out, "--batch-size", "0"], 2, "--batch-size"),
        ([*an, *out, "--batch-size", "-2"], 2, "--batch-size"),
        ([*an[:-2], *out, "--device", "tpu"], 2, "tpu"),
        ([*an, *out, "--config", "bogus"], 2, "bogus"),
        ([*tr, "--data", str(r / "empty")], 1, "no videos"),
        ([*tr, "--data", str(r / "nosplit")], 2, "no train/ folder"),
        ([*tr, "--config", "bogus"], 2, "bogus"),
        ([*tr, "--resume"], 1, "no checkpoint to resume from"),
        ([*tr, "--resume", "--overwrite"], 2, "--overwrite"),
        ([*tr, "--checkpoint-activations", "--compile"], 2, "--checkpoint-activations"),
        ([*tr, "--checkpoint-activations", "--no-memory-saving"], 2, "--checkpoint-activations"),
        ([*tr, "--vgg-weights", str(r / "notes.txt")], 1, "notes.txt"),
        ([*tr, "--vgg-weights", str(r / "none.pth")], 2, "none.pth"),
        ([*tr[:5], "--steps", "0"], 2, "--steps"),
        ([*tr[:5], "--steps", "-5"], 2, "--steps"),
        ([*tr, "--batch-size", "0"], 2, "--batch-size"),
        ([*tr, "--batch-size", "-4"], 2, "--batch-size"),
        ([*tr[:-2], "--device", "tpu"], 2, "tpu"),
        ([*tr, "--out", str(r / "a-file")], 2, "is a file"),
        (["evaluate", "--checkpoint", "/nope", "--data", str(r / "empty")], 2, "/nope"),
        ([*ev], 1, "no videos"),
        ([*ev[:2], str(r / "listgen.pt"), *ev[3:]], 1, "not a state dict"),
        ([*ev[:4], str(r / "nosplit"), *ev[5:]], 2, "no test/ folder"),
        ([*ev, "--max-videos", "0"], 2, "--max-videos"),
        (["animate"], 2, "required"),
        (["paint"], 2, "invalid choice"),
    ]


def test_every_cli_mistake_is_one_line_with_its_exit_code_and_writes_nothing(cli_files, capsys, monkeypatch):
    monkeypatch.chdir(cli_files)  # a mistaken relative path would write here
    before = sorted(p.relative_to(cli_files) for p in cli_files.rglob("*"))
    for argv, code, fragment in _cases(cli_files):
        got = main(argv)
        out, err = capsys.readouterr()
        command = argv[0] if argv[0] != "paint" else ""
        assert got == code, (argv, got, err)
        assert err.count("\n") == 1 and err.startswith(f"fnevr {command}".rstrip() + ": error: "), (argv, err)
        assert fragment in err and "Traceback" not in err and out == "", (argv, err)
        assert sorted(p.relative_to(cli_files) for p in cli_files.rglob("*")) == before, argv


def test_debug_shows_the_traceback_and_the_command_line_is_one_line(cli_files):
    argv = [
        sys.executable,
        "-m",
        "fnevr",
        "evaluate",
        "--checkpoint",
        str(cli_files / "listgen.pt"),
        "--data",
        str(cli_files / "empty"),
    ]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "not a state dict" in debug.stderr
    usage = subprocess.run([sys.executable, "-m", "fnevr", "train", "--steps", "0"], capture_output=True, text=True)
    assert (
        usage.returncode == 2
        and usage.stderr == "fnevr train: error: argument --steps: expected a positive integer, got '0'\n"
    )
