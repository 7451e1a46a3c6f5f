"""Video reading/writing, the FOMM-layout dataset, augmentation and the synthetic dataset."""

import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from fnevr.data import (
    Augmentation,
    DatasetRepeater,
    FramesDataset,
    VideoReadError,
    ensure_synthetic_dataset,
    pose_path,
    read_pose_csv,
    read_video,
    write_pose_csv,
    write_video,
)
from fnevr.data.synthetic import random_identity, random_motion, render_video

T, H, W = 4, 16, 16


def make_frames(t=T, h=H, w=W, seed=0):
    """Smooth, distinct frames (codec-friendly): a gradient whose colour depends on the frame."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    g = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(t):
        colour = torch.rand(3, generator=g) * 0.5 + 0.25
        frames.append(torch.stack([colour[0] * x, colour[1] * y, colour[2] * (1 - x) * 0 + colour[2]], -1))
    return (torch.stack(frames) * 255).round().to(torch.uint8)


def write_layout(path, frames, layout):
    """Write ``frames`` as a video at ``path`` (without suffix) in ``layout``; returns the path used."""
    if layout == "folder":
        path.mkdir()
        for i, frame in enumerate(frames):
            iio.imwrite(path / f"{i:03d}.png", frame.numpy())
        (path / "notes.txt").write_text("ignored")
        return path
    if layout == "strip":
        out = path.with_name(path.name + ".png")
        iio.imwrite(out, frames.permute(1, 0, 2, 3).reshape(frames.shape[1], -1, 3).numpy())
        return out
    if layout == "gif":
        out = path.with_name(path.name + ".gif")
        iio.imwrite(out, frames.numpy(), duration=100, loop=0)
        return out
    out = path.with_name(path.name + ".mp4")
    write_video(out, frames, fps=10)
    return out


@pytest.mark.parametrize("layout,tol", [("folder", 0), ("strip", 0), ("gif", 8), ("mp4", 12)])
def test_read_video_layouts(tmp_path, layout, tol):
    frames = make_frames()
    path = write_layout(tmp_path / "clip", frames, layout)
    video = read_video(path)
    assert video.dtype == torch.uint8 and video.shape == (T, H, W, 3)
    err = (video.float() - frames.float()).abs().mean().item()
    assert err <= tol, f"{layout}: mean abs error {err}"
    # Frames differ from each other, so a wrong order or a repeated frame would show.
    assert all(
        (video[i].float() - frames[j].float()).abs().mean() > (video[i].float() - frames[i].float()).abs().mean()
        for i in range(T)
        for j in range(T)
        if i != j
    )


def test_read_video_resizes_antialiased(tmp_path):
    frames = make_frames()
    frames[:, :, :, :] = frames[:, :1, :1, :]  # uniform frames stay uniform under any proper resize
    path = write_layout(tmp_path / "clip", frames, "strip")
    small = read_video(path, frame_shape=(8, 6, 3))
    assert small.shape == (T, 8, 6, 3)
    assert torch.equal(small, frames[:, :8, :6])
    # A 1-pixel checkerboard averages to grey when antialiased (plain subsampling would keep 0 or 255).
    board = ((torch.arange(16)[:, None] + torch.arange(16)) % 2 * 255).to(torch.uint8)
    iio.imwrite(tmp_path / "board.png", board[..., None].expand(16, 16, 3).numpy())
    grey = read_video(tmp_path / "board.png", frame_shape=(4, 4)).float()
    assert (grey - 127.5).abs().max() < 2


def test_read_video_grey_and_alpha(tmp_path):
    grey = (torch.arange(8 * 16) % 251).to(torch.uint8).view(8, 16)
    iio.imwrite(tmp_path / "grey.png", grey.numpy())
    video = read_video(tmp_path / "grey.png")
    assert video.shape == (2, 8, 8, 3) and torch.equal(video[..., 0], video[..., 2])
    rgba = torch.randint(0, 256, (8, 8, 4), dtype=torch.uint8)
    iio.imwrite(tmp_path / "rgba.png", rgba.numpy())
    assert torch.equal(read_video(tmp_path / "rgba.png")[0], rgba[..., :3])


def test_write_video_odd_size_is_playable(tmp_path):
    frames = make_frames(t=3, h=15, w=21)
    write_video(tmp_path / "odd.mp4", frames.float() / 255, fps=5)
    video = read_video(tmp_path / "odd.mp4")
    assert video.shape == (3, 16, 22, 3)  # padded to even sizes for yuv420p
    assert (video[:, :15, :21].float() - frames.float()).abs().mean() < 12
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "bad.mp4", torch.zeros(3, 8, 8), fps=5)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("corrupt.mp4", b"this is not a movie" * 10, None),
        ("corrupt.png", b"\x89PNG garbage", None),
        ("empty.gif", b"", None),
        ("emptydir", None, "no frame images"),
        ("missing.mp4", "missing", "no such file"),
        ("ragged.png", "ragged", "multiple of its height"),
        ("clip.avi", b"data", "unsupported suffix"),
    ],
)
def test_read_video_errors_name_the_path(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content == "ragged":
        iio.imwrite(path, np.zeros((8, 20, 3), np.uint8))
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(VideoReadError, match=reason) as info:
        read_video(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def make_dataset(root, layouts=("folder", "strip", "gif", "mp4"), names=("a#1", "a#2", "b#1", "c#1")):
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    for seed, (layout, name) in enumerate(zip(layouts, names)):
        write_layout(root / "train" / name, make_frames(seed=seed), layout)
    write_layout(root / "test" / "d#1", make_frames(t=5, seed=9), "strip")
    return root


def test_dataset_items(tmp_path):
    root = make_dataset(tmp_path)
    train = FramesDataset(root, frame_shape=(H, W, 3), seed=0)
    assert len(train) == 4 and train.videos == ["a#1", "a#2.png", "b#1.gif", "c#1.mp4"]
    for i in range(len(train)):
        item = train[i]
        assert item["name"] == train.videos[i] and "pose" not in item
        frames = read_video(root / "train" / item["name"]).permute(0, 3, 1, 2).float() / 255
        for key in ("source", "driving"):
            assert item[key].shape == (3, H, W) and item[key].dtype == torch.float32
            assert 0 <= item[key].min() and item[key].max() <= 1
            assert (frames - item[key]).abs().flatten(1).amax(1).min() < 1e-6  # one of the video's frames
    test = FramesDataset(root, frame_shape=(8, 8), is_train=False)
    assert len(test) == 1 and test[0]["video"].shape == (3, 5, 8, 8) and test[0]["name"] == "d#1.png"
    with pytest.raises(FileNotFoundError, match="train"):
        FramesDataset(tmp_path / "nowhere")


def test_dataset_seeded_items_are_reproducible(tmp_path):
    root = make_dataset(tmp_path, layouts=("folder",) * 4)
    aug = {"flip_param": {"horizontal_flip": True, "time_flip": True}, "jitter_param": {"hue": 0.1}}
    a = DatasetRepeater(FramesDataset(root, (H, W), augmentation=aug, seed=5), 3)
    b = DatasetRepeater(FramesDataset(root, (H, W), augmentation=aug, seed=5), 3)
    pairs = set()
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["source"], y["source"]) and torch.equal(x["driving"], y["driving"])
        pairs.add((x["name"], x["source"].sum().item(), x["driving"].sum().item()))
    assert len(pairs) > len(a.dataset)  # repeats draw different pairs
    first = a[0]["source"]
    a.set_epoch(1)
    assert not all(torch.equal(a[i]["source"], b[i]["source"]) for i in range(len(a)))
    a.set_epoch(0)
    assert torch.equal(a[0]["source"], first)


def test_id_sampling_and_num_repeats(tmp_path):
    root = make_dataset(tmp_path, layouts=("strip",) * 4)
    ds = FramesDataset(root, (H, W), id_sampling=True, seed=0)
    assert len(ds) == 3 and ds.ids == ["a", "b", "c"]
    names = {ds.sample(0, key)["name"] for key in range(40)}
    assert names == {"a#1.png", "a#2.png"}  # identity a: both of its clips, nothing else
    assert ds[1]["name"] == "b#1.png" and ds[2]["name"] == "c#1.png"
    rep = DatasetRepeater(ds, num_repeats=5)
    assert len(rep) == 15
    assert [rep[i]["name"].split("#")[0] for i in range(15)] == ["a", "b", "c"] * 5
    with pytest.raises(IndexError):
        rep[15]
    with pytest.raises(ValueError, match="num_repeats"):
        DatasetRepeater(ds, 0)


def test_dataset_skips_unreadable_video(tmp_path):
    root = make_dataset(tmp_path, layouts=("strip",) * 4)
    (root / "train" / "a#0.mp4").write_bytes(b"not a video")
    ds = FramesDataset(root, (H, W), seed=0)
    assert ds.videos[0] == "a#0.mp4"
    with pytest.warns(RuntimeWarning, match="a#0.mp4"):
        item = ds[0]
    assert item["name"] == "a#1.png"  # the next video of the list
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad: skipped silently afterwards
        assert ds[0]["name"] == "a#1.png"
    # With id sampling, an identity whose clip is unreadable falls back to its other clip.
    (root / "train" / "b#0.gif").write_bytes(b"")
    by_id = FramesDataset(root, (H, W), id_sampling=True, seed=0)
    with pytest.warns(RuntimeWarning, match="b#0.gif"):
        assert {by_id.sample(1, key)["name"] for key in range(12)} == {"b#1.png"}
    lone = tmp_path / "lone"
    (lone / "train").mkdir(parents=True)
    (lone / "train" / "z#0.gif").write_bytes(b"")
    write_layout(lone / "train" / "z#1", make_frames(), "strip")
    with pytest.warns(RuntimeWarning, match="z#0.gif"):
        assert {FramesDataset(lone, (H, W), id_sampling=True, seed=0).sample(0, key)["name"] for key in range(8)} == {
            "z#1.png"
        }
    # Nothing readable at all: a clear error.
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "train" / "x.gif").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="x.gif"), pytest.raises(RuntimeError, match="no readable video"):
        FramesDataset(bad, (H, W))[0]


def test_dataset_poses(tmp_path):
    """Frame i has value 20 i in its left half; its pose is i * (1, 2, 3). A pair's pose must be the
    driving-minus-source difference, with yaw and roll negated when flipped."""
    root = tmp_path
    (root / "train").mkdir()
    frames = torch.zeros(6, H, W, 3, dtype=torch.uint8)
    for i in range(6):
        frames[i, :, : W // 2] = 20 * (i + 1)
    video = write_layout(root / "train" / "p#1", frames, "folder")
    write_pose_csv(pose_path(video), [[i, 2 * i, 3 * i] for i in range(6)])
    assert torch.equal(read_pose_csv(pose_path(video))[5], torch.tensor([5.0, 10.0, 15.0]))
    ds = FramesDataset(root, (H, W), augmentation={"flip_param": {"horizontal_flip": True, "time_flip": True}}, seed=1)
    flips = set()
    for key in range(30):
        item = ds.sample(0, key)
        flipped = item["source"][0, 0, 0] == 0  # the bright half moved right
        source = round(item["source"].max().item() * 255 / 20) - 1
        driving = round(item["driving"].max().item() * 255 / 20) - 1
        sign = torch.tensor([-1.0, 1.0, -1.0]) if flipped else torch.ones(3)
        assert torch.allclose(item["pose"], (driving - source) * torch.tensor([1.0, 2.0, 3.0]) * sign)
        flips.add((bool(flipped), source > driving))
    assert flips == {(False, False), (True, False), (False, True), (True, True)}


def test_augmentation_is_consistent_across_frames():
    image = torch.rand(3, 12, 12)
    clip = torch.stack([image, image])
    aug = Augmentation(
        horizontal_flip=True, time_flip=True, jitter={"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1}
    )
    seen = set()
    for seed in range(12):
        out, info = aug(clip, torch.Generator().manual_seed(seed))
        assert torch.equal(out[0], out[1])  # same flip and jitter on both frames
        assert not torch.equal(out[0], image) and not torch.equal(out[0], image.flip(-1))  # jittered
        seen.add(info["horizontal_flip"])
    assert seen == {True, False}
    flip_only = Augmentation(horizontal_flip=True, time_flip=True)
    pair = torch.rand(2, 3, 8, 8)
    for seed in range(12):
        out, info = flip_only(pair, torch.Generator().manual_seed(seed))
        expected = pair.flip(0) if info["time_flip"] else pair
        expected = expected.flip(-1) if info["horizontal_flip"] else expected
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="jitter"):
        Augmentation(jitter={"sharpness": 1})
    with pytest.raises(ValueError, match="hue"):
        Augmentation(jitter={"hue": 0.7})


SMALL = dict(size=32, num_frames=6, num_train=4, num_test=2, clips_per_id=2)


def test_synthetic_dataset_is_deterministic_and_moves(tmp_path):
    a = ensure_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    b = ensure_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    c = ensure_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files if f.suffix == ".png"] == [
        "test/id0002#clip00.png",
        "test/id0002#clip01.png",
        "train/id0000#clip00.png",
        "train/id0000#clip01.png",
        "train/id0001#clip00.png",
        "train/id0001#clip01.png",
    ]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left

    video = read_video(a / "train" / "id0000#clip00.png")
    assert video.shape == (6, 32, 32, 3)
    steps = (video[1:].float() - video[:-1].float()).abs().mean(dim=(1, 2, 3))
    assert (steps > 0.5).all(), f"consecutive frames barely differ: {steps}"
    other = read_video(a / "train" / "id0001#clip00.png")
    assert (video[0].float() - other[0].float()).abs().mean() > 10  # another face
    same_person = read_video(a / "train" / "id0000#clip01.png")
    assert (video.float().mean((0, 1, 2)) - same_person.float().mean((0, 1, 2))).abs().max() < (
        video.float().mean((0, 1, 2)) - other.float().mean((0, 1, 2))
    ).abs().max() + 20

    item = FramesDataset(a, (32, 32), id_sampling=True, seed=0)[0]
    assert item["pose"].shape == (3,) and item["pose"].abs().max() < 60
    assert read_pose_csv(a / "train" / "id0000#clip00.pose.csv").shape == (6, 3)


def test_synthetic_dataset_reuse_and_conflicts(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "d", seed=0, **SMALL)
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path / "d", seed=0, **SMALL) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp  # not rebuilt
    with pytest.raises(FileExistsError, match="parameters"):
        ensure_synthetic_dataset(tmp_path / "d", seed=1, **SMALL)
    with pytest.raises(ValueError, match="num_frames"):
        ensure_synthetic_dataset(tmp_path / "e", num_frames=1)


def test_synthetic_faces_vary_and_blink():
    faces = [
        render_video(
            random_identity(np.random.default_rng([0, 0, i])),
            random_motion(np.random.default_rng([0, 1, i, 0]), 16),
            48,
        )
        for i in range(4)
    ]
    means = torch.stack([f.float().mean((0, 1, 2)) for f in faces])
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 3  # colours differ between people
    motion = random_motion(np.random.default_rng(0), 64)
    assert motion["eyes_open"].min() < 0.5 and motion["eyes_open"].max() == 1  # at least one blink
    assert motion["mouth_open"].max() > 0.3 and motion["mouth_open"].min() == 0  # speaks and closes


def test_dataloader_workers_give_the_same_batches(tmp_path):
    """Seeded items do not depend on which worker draws them (what makes resumed runs exact)."""
    root = ensure_synthetic_dataset(tmp_path / "s", **SMALL)
    aug = {"flip_param": {"horizontal_flip": True, "time_flip": True}, "jitter_param": {"brightness": 0.1}}
    ds = DatasetRepeater(FramesDataset(root, (32, 32), id_sampling=True, augmentation=aug, seed=0), 3)
    inline = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    workers = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert len(inline) == len(workers) == 3
    for a, b in zip(inline, workers):
        assert a["name"] == b["name"]
        assert a["source"].shape == (2, 3, 32, 32) and a["pose"].shape == (2, 3)
        for key in ("source", "driving", "pose"):
            assert torch.equal(a[key], b[key])
