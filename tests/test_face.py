"""Real faces: detection, crops, paste-back, audio and the streaming API (fnevr.face, fnevr.Animator,
``fnevr animate --crop/--paste-back``).

The face is scikit-image's bundled astronaut photograph (Eileen Collins; her face, brow to chin, spans
about x 180-270, y 70-165 of the 512x512 image). The driving video moves, turns and shrinks it over
a generated background, with a generated tone as its audio track, so every expected face position
is known from the transform that made the frame."""

import math
import subprocess

import cv2  # opencv-python-headless<5 (fnevr[face]) and scikit-image: test dependencies (Makefile)
import numpy as np
import pytest
import skimage.data as skimage_data
import torch

from fnevr.animator import Animator
from fnevr.checkpoint import save_checkpoint
from fnevr.cli import main
from fnevr.data.video import VideoWriter, has_audio, read_image, read_video
from fnevr.face import (
    Crop,
    FaceTracker,
    HaarFaceDetector,
    Letterbox,
    NoFaceError,
    describe_missing,
    to_float,
    to_uint8,
)
from fnevr.model import FNeVR

FACE_CENTRE = (225.0, 117.0)  # of the astronaut's face, brow to chin
FACE_SIDE = 95.0
FRAMES = 8


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return w * h / (area(a) + area(b) - w * h)


def moved(t: int):
    """Frame ``t``'s transform: the face's centre in the 240x320 frame, its turn (degrees), scale."""
    return (130.0 + 8 * t, 110.0 + 3 * t), 12.0 * math.sin(t), 0.5


def driving_frame(t: int, face: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(t)
    y, x = np.mgrid[0:240, 0:320]
    background = np.stack([x * 0.5, y * 0.6 + 40, 120 + 0 * x], -1) + rng.normal(0, 4, (240, 320, 3))
    frame = np.clip(background, 0, 255).astype(np.uint8)
    (cx, cy), angle, scale = moved(t)
    matrix = cv2.getRotationMatrix2D(FACE_CENTRE, angle, scale)
    matrix[:, 2] += (cx - FACE_CENTRE[0], cy - FACE_CENTRE[1])
    cv2.warpAffine(face, matrix, (320, 240), dst=frame, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_TRANSPARENT)
    return frame


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def files(tmp_path_factory, astronaut):
    import imageio.v3 as iio
    import imageio_ffmpeg

    root = tmp_path_factory.mktemp("face")
    torch.manual_seed(0)
    save_checkpoint(root / "small.pt", FNeVR("small", training_modules=False))
    iio.imwrite(root / "source.png", astronaut[:, 40:440])  # 512 high, 400 wide: not square
    iio.imwrite(root / "blank.png", np.full((96, 128, 3), 128, np.uint8))
    tone = root / "tone.wav"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=2",
            str(tone),
        ],
        check=True,
    )
    frames = [driving_frame(t, astronaut) for t in range(FRAMES)]
    with VideoWriter(root / "driving.mp4", fps=10, crf=12, audio=tone) as writer:
        for frame in frames:
            writer.write(frame)
    with VideoWriter(root / "silent.mp4", fps=10, crf=12) as writer:
        for frame in frames:
            writer.write(frame)
    with VideoWriter(root / "blank.mp4", fps=10) as writer:
        for _ in range(3):
            writer.write(np.full((96, 128, 3), 128, np.uint8))
    np.save(root / "frames.npy", np.stack(frames))
    return root


def small_animator(files, **options):
    return Animator(files / "small.pt", device="cpu", **options)


def cli(files, tmp_path, *extra, out="out.mp4", source="source.png", driving="driving.mp4"):
    out = tmp_path / out
    code = main(
        ["animate", "--source", str(files / source), "--driving", str(files / driving)]
        + ["--checkpoint", str(files / "small.pt"), "--out", str(out), "--device", "cpu", *extra]
    )
    return code, out


# --- detection and geometry ----------------------------------------------------------------------------------


def test_haar_finds_the_astronauts_face(astronaut):
    faces = HaarFaceDetector()(astronaut)
    assert len(faces) == 1
    half = FACE_SIDE / 2
    truth = (FACE_CENTRE[0] - half, FACE_CENTRE[1] - half, FACE_CENTRE[0] + half, FACE_CENTRE[1] + half)
    assert iou(faces[0], truth) > 0.75, faces


def test_the_tracker_follows_the_face_through_the_driving_frames(astronaut):
    detect = HaarFaceDetector()
    tracker = FaceTracker(detect, 64, scale=1.0, smoothing=0.0)
    for t in range(FRAMES):
        frame = driving_frame(t, astronaut)
        (cx, cy), _, scale = moved(t)
        side = FACE_SIDE * scale
        crop = tracker(frame)  # scale 1, no smoothing: the detected face's box, lifted by a tenth
        assert isinstance(crop, Crop), f"frame {t}"
        assert abs(crop.x0 + crop.side / 2 - cx) < 0.2 * side, (t, crop)
        assert abs(crop.y0 + crop.side / 2 + 0.1 * crop.side - cy) < 0.2 * side, (t, crop)
        assert 0.75 < crop.side / side < 1.33
    assert len(detect(driving_frame(6, astronaut))) == 2  # frame 6 has a false face too: the suit's ring


def test_a_cascade_from_a_path_and_its_errors(tmp_path, astronaut):
    import shutil

    shutil.copy(f"{cv2.data.haarcascades}haarcascade_frontalface_alt2.xml", tmp_path / "alt2.xml")
    assert HaarFaceDetector(tmp_path / "alt2.xml")(astronaut)
    (tmp_path / "bad.xml").write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match=r"bad\.xml: not an OpenCV cascade"):
        HaarFaceDetector(tmp_path / "bad.xml")
    with pytest.raises(FileNotFoundError, match=r"missing\.xml: no such file"):
        HaarFaceDetector(tmp_path / "missing.xml")


def test_crop_is_a_square_around_the_face_with_margin():
    crop = Crop.around((100.0, 50.0, 140.0, 100.0), size=64, scale=2.0, lift=0.1)
    assert crop.side == 100  # twice the longer side (50)
    assert crop.x0 + crop.side / 2 == 120 and crop.y0 + crop.side / 2 == 70  # centre 75, lifted by 5


def test_crop_outside_the_frame_repeats_the_edge():
    image = torch.rand(3, 40, 60, dtype=torch.float64)
    crop = Crop(x0=-10, y0=-10, side=30, size=30)  # no resize: pixels map one to one
    out = crop.cut(image)
    assert out.shape == (3, 30, 30)
    assert torch.equal(out[:, 10:, 10:], image[:, :20, :20])
    assert torch.equal(out[:, :10, 10:], image[:, :1, :20].expand(3, 10, 20))  # rows above repeat row 0
    assert torch.equal(out[:, 10:, :10], image[:, :20, :1].expand(3, 20, 10))
    inside = Crop(x0=5, y0=4, side=20, size=20).cut(image)
    assert torch.equal(inside, image[:, 4:24, 5:25])


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (33, 33), (10, 97)])
def test_letterbox_keeps_the_aspect(shape):
    image = torch.rand(3, *shape)
    box = Letterbox(*shape, size=32)
    square = box.cut(image)
    assert square.shape == (3, 32, 32)
    h, w = box.inner
    assert max(h, w) == 32 and abs(h / w - shape[0] / shape[1]) < 1.5 / min(h, w)
    assert torch.equal(
        box.undo(square), torch.nn.functional.interpolate(image[None], (h, w), mode="bilinear", antialias=True)[0]
    )


def test_paste_back_changes_only_the_box_and_feathers_its_edge():
    torch.manual_seed(0)
    background = torch.rand(3, 100, 120)
    crop = Crop(x0=80, y0=-20, side=60, size=30)  # leaves the frame on two sides
    square = torch.rand(3, 30, 30)
    out = crop.paste(background, square, feather=0.2)
    assert out.shape == background.shape
    inside = torch.zeros(100, 120, dtype=torch.bool)
    inside[0:40, 80:120] = True
    assert torch.equal(out[:, ~inside], background[:, ~inside])
    patch = torch.nn.functional.interpolate(square[None], (60, 60), mode="bilinear", antialias=True)[0]
    core = slice(12 + 20, 48), slice(92, 120 - 12)  # rows 12..48 of the box are frame rows -8..28
    assert torch.allclose(out[:, 12:28, 92:108], patch[:, 32:48, 12:28], atol=1e-6), core
    mask = crop.feather_mask(0.2)
    assert mask[0, 0] < 0.01 and mask[30, 30] == 1 and 0 < mask[5, 30] < 1
    edge = out[:, 39, 100] - background[:, 39, 100]  # in the ramp: part of the way to the patch
    assert torch.all(edge.abs() <= (patch[:, 59, 20] - background[:, 39, 100]).abs() + 1e-6)


def test_tracker_smooths_keeps_the_last_box_and_names_missing_frames():
    boxes = [(10, 10, 30, 30), (20, 10, 40, 30), None, (20, 10, 40, 30)]
    detections = iter(boxes)
    tracker = FaceTracker(lambda image: [] if (b := next(detections)) is None else [b], 64, smoothing=0.5, scale=1.0)
    image = np.zeros((50, 60, 3), np.uint8)
    placements = [tracker(image) for _ in boxes]
    assert placements[0] == Crop.around(boxes[0], 64, scale=1.0)
    assert placements[1].x0 + placements[1].side / 2 == pytest.approx(25, abs=1)  # halfway from 20 to 30
    assert placements[2] == placements[1] and tracker.missing == [2]
    first = FaceTracker(lambda image: [], 64)
    assert isinstance(first(np.zeros((50, 60, 3), np.uint8)), Letterbox)
    stop = FaceTracker(lambda image: [], 64, no_face="stop", name="clip.mp4")
    with pytest.raises(NoFaceError, match=r"no face found in clip\.mp4 frame 0"):
        stop(image)
    assert describe_missing("v.mp4", [3, 4, 5, 9], 20) == "no face found in v.mp4 frames 3-5, 9 (4 of 20)"


# --- the streaming API and the CLI ------------------------------------------------------------------------------


def test_streaming_equals_batch(files):
    frames = np.load(files / "frames.npy")
    source = read_image(files / "source.png")[0].numpy()
    stream = small_animator(files, crop=True, paste_back=True).set_source(source)
    streamed = [stream(frame) for frame in frames]
    batch = small_animator(files, crop=True, paste_back=True).set_source(source)
    batched = list(batch.animate(frames, batch_size=3))
    assert len(streamed) == len(batched) == FRAMES
    for a, b in zip(streamed, batched):
        assert a.shape == source.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # fp round-off of batch 1 vs 3
    assert stream.tracker.missing == [] and batch.tracker.missing == []


def test_compiled_animator_gives_the_eager_frames(files):
    frames = np.load(files / "frames.npy")[:2]
    eager = small_animator(files, crop=True).set_source(frames[0])
    compiled = small_animator(files, crop=True, compile=True).set_source(frames[0])
    for frame in frames:
        assert np.abs(eager(frame).astype(int) - compiled(frame).astype(int)).max() <= 1


def test_paste_back_keeps_the_source_outside_the_feathered_box(files):
    source = read_image(files / "source.png")[0].numpy()
    animator = small_animator(files, crop=True, paste_back=True).set_source(source)
    crop = animator.source_placement
    assert isinstance(crop, Crop) and 150 < crop.side < 250  # about twice the face
    out = animator(np.load(files / "frames.npy")[3])
    assert out.shape == source.shape
    outside = np.ones(source.shape[:2], bool)
    outside[max(crop.y0, 0) : crop.y0 + crop.side, max(crop.x0, 0) : crop.x0 + crop.side] = False
    assert np.array_equal(out[outside], source[outside])
    assert not np.array_equal(out[~outside], source[~outside])


def test_relative_motion_starts_from_the_first_frame_and_reset(files):
    frames = np.load(files / "frames.npy")
    animator = small_animator(files, crop=True).set_source(frames[0])
    first = animator(frames[0])
    later = animator(frames[5])
    animator.reset()
    assert np.array_equal(animator(frames[5]), first)  # after reset, frame 5 is the new reference
    assert not np.array_equal(later, first)
    assert first.shape == (64, 64, 3)  # the crop itself, at the model's size


def test_cli_paste_back_keeps_size_and_audio(files, tmp_path, capsys):
    code, out = cli(files, tmp_path, "--paste-back", "--batch-size", "3")
    assert code == 0
    assert read_video(out).shape == (FRAMES, 512, 400, 3)
    assert has_audio(out)
    assert "with the driving video's audio" in capsys.readouterr().out
    code, quiet = cli(files, tmp_path, "--paste-back", "--no-audio", out="quiet.mp4")
    assert code == 0 and not has_audio(quiet)
    code, silent = cli(files, tmp_path, "--crop", driving="silent.mp4", out="silent.mp4")
    assert code == 0 and not has_audio(silent)
    assert read_video(silent).shape == (FRAMES, 64, 64, 3)


def test_cli_without_crop_is_undistorted_and_writes_gifs(files, tmp_path):
    code, out = cli(files, tmp_path, "--fps", "5", out="out.gif")
    assert code == 0
    assert read_video(out).shape == (FRAMES, 64, 50, 3)  # 512x400 letterboxed into 64x64
    code, rec = cli(files, tmp_path, "--source-frame", "2", source="driving.mp4", out="rec.mp4")
    assert code == 0
    assert read_video(rec).shape == (FRAMES, 48, 64, 3)  # the 240x320 driving frame 2 as source


def test_cli_no_face(files, tmp_path, capsys):
    code, _ = cli(files, tmp_path, "--crop", "--no-face", "stop", source="blank.png")
    assert code == 1
    assert f"no face found in {files / 'blank.png'}" in capsys.readouterr().err
    code, out = cli(files, tmp_path, "--crop", source="blank.png")
    assert code == 0
    assert "blank.png: it is used whole" in capsys.readouterr().err
    assert read_video(out).shape == (FRAMES, 48, 64, 3)  # letterboxed, 96x128
    code, _ = cli(files, tmp_path, "--crop", "--no-face", "stop", driving="blank.mp4")
    assert code == 1
    assert f"no face found in {files / 'blank.mp4'} frame 0" in capsys.readouterr().err
    code, _ = cli(files, tmp_path, "--crop", driving="blank.mp4")
    assert code == 0
    assert f"no face found in {files / 'blank.mp4'} frames 0-2 (3 of 3)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--side-by-side", "--paste-back"], "does not go with --paste-back"),
        (["--crf", "60"], "--crf: expected an integer from 0 to 51"),
        (["--smoothing", "1"], "--smoothing: expected a number in [0, 1)"),
        (["--crop", "--face-cascade", "nowhere.xml"], "--face-cascade nowhere.xml: no such file"),
        (["--face-cascade", "nowhere.xml"], "--face-cascade goes with --crop"),
    ],
)
def test_cli_usage_errors(files, tmp_path, capsys, extra, message):
    code, out = cli(files, tmp_path, *extra)
    assert code == 2 and not out.exists()
    assert message in capsys.readouterr().err


def test_cli_source_frame_errors(files, tmp_path, capsys):
    code, _ = cli(files, tmp_path, "--source-frame", "99", source="driving.mp4")
    assert code == 1
    assert f"--source-frame 99: {files / 'driving.mp4'} has {FRAMES} frames" in capsys.readouterr().err
    code, _ = cli(files, tmp_path, "--source-frame", "1")
    assert code == 1
    assert "is an image (one frame)" in capsys.readouterr().err


def test_float_and_uint8_frames_round_trip():
    frame = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(to_float(frame)), frame)
    with pytest.raises(ValueError, match="expected an RGB uint8 frame"):
        to_float(frame.astype(np.float32))
