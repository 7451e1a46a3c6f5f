"""The ``fnevr`` command end to end: animate and reconstruct with a random small model on a small
generated video, writing playable mp4s; help texts. Its error handling is in test_faults.py."""

import subprocess
import sys

import pytest
import torch

from fnevr.animate import hull_area, relative_keypoints
from fnevr.checkpoint import save_checkpoint
from fnevr.cli import main
from fnevr.data.video import read_video, write_video
from fnevr.model import FNeVR


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_checkpoint(root / "small.pt", FNeVR("small", training_modules=False))
    t = torch.linspace(0, 1, 6).view(6, 1, 1)
    y, x = torch.meshgrid(torch.linspace(0, 1, 80), torch.linspace(0, 1, 96), indexing="ij")
    frames = torch.stack([x * (1 - t) + t * y, y.expand(6, -1, -1), 0.5 * x.expand(6, -1, -1)], -1)  # [6, 80, 96, 3]
    write_video(root / "driving.mp4", (frames * 255).round().to(torch.uint8), fps=10)
    import imageio.v3 as iio

    iio.imwrite(root / "source.png", (frames[0] * 255).round().to(torch.uint8).numpy())
    return root


def test_animate_writes_a_playable_video(files, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert (
        main(
            [
                "animate",
                "--source",
                str(files / "source.png"),
                "--driving",
                str(files / "driving.mp4"),
                "--checkpoint",
                str(files / "small.pt"),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    video = read_video(out)
    assert video.shape == (6, 54, 64, 3)  # 80x96 letterboxed into 64x64: 53 rows, padded to even
    assert "wrote" in capsys.readouterr().out


def test_reconstruct_side_by_side(files, tmp_path, capsys):
    out = tmp_path / "rec.mp4"
    main(
        [
            "reconstruct",
            "--video",
            str(files / "driving.mp4"),
            "--checkpoint",
            str(files / "small.pt"),
            "--out",
            str(out),
            "--side-by-side",
            "--backend",
            "reference",
        ]
    )
    assert read_video(out).shape == (6, 64, 3 * 64, 3)


@pytest.mark.parametrize(
    "command",
    [["--help"], ["animate", "--help"], ["reconstruct", "--help"], ["train", "--help"], ["evaluate", "--help"]],
)
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "fnevr", *command], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: fnevr" in result.stdout
    if command == ["--help"]:
        for name in ("train", "evaluate", "animate", "reconstruct"):
            assert name in result.stdout


def test_relative_motion():
    square = torch.tensor([[[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]])
    assert hull_area(square[0]) == pytest.approx(1.0)
    assert hull_area(torch.cat([square[0], torch.zeros(1, 2)])) == pytest.approx(1.0)  # inner point ignored
    eye = torch.eye(2).expand(1, 4, 2, 2)
    kp_source = {"value": square * 0.5, "jacobian": eye}
    kp_initial = {"value": square, "jacobian": eye}
    moved = {"value": square + 0.2, "jacobian": 2 * eye}
    out = relative_keypoints(kp_source, moved, kp_initial, adapt_movement_scale=True)
    # source hull is 1/4 of the initial one: the motion is scaled by sqrt(1/4)
    assert torch.allclose(out["value"], square * 0.5 + 0.1)
    assert torch.allclose(out["jacobian"], 2 * eye)
    same = relative_keypoints(kp_source, kp_initial, kp_initial)
    assert torch.allclose(same["value"], kp_source["value"]) and torch.allclose(same["jacobian"], eye)
