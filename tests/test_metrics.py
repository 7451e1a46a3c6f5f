"""Evaluation metrics against known values; LPIPS weights by path, never downloaded."""

import logging
import math

import pytest
import torch

import fnevr.metrics as metrics
from fnevr.metrics import evaluate_pairs, find_lpips_backbone, load_lpips


def test_l1_and_psnr_of_known_errors():
    target = torch.zeros(2, 3, 16, 16)
    pred = torch.empty(2, 3, 16, 16)
    pred[0], pred[1] = 0.1, 0.01  # MSE 1e-2 and 1e-4: PSNR 20 dB and 40 dB
    result = evaluate_pairs(pred, target)
    assert math.isclose(result["l1"], (0.1 + 0.01) / 2, rel_tol=1e-5)
    assert math.isclose(result["psnr"], 30.0, rel_tol=1e-5)  # mean of the per-image PSNRs
    # Chunking does not change the means.
    noisy = torch.rand(5, 3, 16, 16)
    clean = torch.rand(5, 3, 16, 16)
    whole, chunked = evaluate_pairs(noisy, clean), evaluate_pairs(noisy, clean, chunk=2)
    assert all(math.isclose(whole[k], chunked[k], rel_tol=1e-5) for k in whole)


def test_ssim():
    image = torch.rand(3, 3, 32, 32)
    same = evaluate_pairs(image, image.clone())
    assert math.isclose(same["ssim"], 1.0, rel_tol=1e-6) and same["l1"] == 0 and same["psnr"] == math.inf
    noisy = evaluate_pairs((image + 0.1 * torch.randn_like(image)).clamp(0, 1), image)["ssim"]
    very_noisy = evaluate_pairs((image + 0.4 * torch.randn_like(image)).clamp(0, 1), image)["ssim"]
    assert 0 < very_noisy < noisy < 1
    # A constant shift c of a constant image: SSIM = luminance term (2 mu x + C1) / (mu^2 + x^2 + C1).
    flat = torch.full((1, 3, 32, 32), 0.4)
    c1 = 0.01**2
    expected = (2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1)
    assert math.isclose(evaluate_pairs(flat + 0.2, flat)["ssim"], expected, rel_tol=1e-3)  # fp32 variances


def test_bad_inputs():
    with pytest.raises(ValueError, match="N, 3, H, W"):
        evaluate_pairs(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 8))
    with pytest.raises(ValueError, match="11x11"):
        evaluate_pairs(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture(scope="module")
def alexnet_state():
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = alexnet(weights=None).features
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def test_lpips_without_weights_is_skipped_with_a_message(empty_hub, caplog):
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert load_lpips() is None
    assert "LPIPS skipped" in caplog.text and str(empty_hub / "checkpoints" / "alexnet-*.pth") in caplog.text
    assert "lpips" not in evaluate_pairs(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), lpips=None)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_lpips(empty_hub / "absent.pth")
    with pytest.raises(ValueError, match="net"):
        load_lpips(net="resnet")


def test_lpips_from_a_path(tmp_path, alexnet_state, empty_hub):
    path = tmp_path / "alexnet-random.pth"
    torch.save(alexnet_state, path)
    net = load_lpips(path)
    # The backbone holds the saved weights (torchmetrics names layers by their index in features).
    assert torch.equal(getattr(net.net.slice1, "0").weight, alexnet_state["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "10").bias, alexnet_state["features.10.bias"])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x = torch.rand(3, 3, 64, 64)
    assert evaluate_pairs(x, x, lpips=net)["lpips"] == 0
    slightly = evaluate_pairs((x + 0.05 * torch.randn_like(x)).clamp(0, 1), x, lpips=net)["lpips"]
    far = evaluate_pairs(torch.rand(3, 3, 64, 64), x, lpips=net)["lpips"]
    assert 0 < slightly < far
    # The hub cache is searched when no path is given.
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(alexnet_state, empty_hub / "checkpoints" / "alexnet-owt-7be5be79.pth")
    assert find_lpips_backbone() == empty_hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert torch.equal(getattr(load_lpips().net.slice1, "0").weight, alexnet_state["features.0.weight"])


# --- AKD and AED -------------------------------------------------------------------------------------------------


class _Landmarks(torch.nn.Module):
    """68 points that move with the image's brightness, NaN for a black image ("no face")."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3))
        grid = torch.arange(68, dtype=images.dtype).view(1, 68, 1).expand(images.shape[0], 68, 2)
        points = grid + 100 * mean.view(-1, 1, 1)
        return torch.where((mean > 0).view(-1, 1, 1), points, torch.full_like(points, float("nan")))


class _Identity(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) * 10


def test_keypoint_and_embedding_distances():
    pred = torch.zeros(3, 2, 2)
    target = torch.zeros(3, 2, 2)
    target[0, :, 0] = 3.0
    target[0, :, 1] = 4.0  # frame 0: both points 5 apart
    target[1, 0] = torch.tensor([1.0, 0.0])  # frame 1: 1 and 0 apart
    pred[2] = float("nan")  # frame 2: no face found
    assert metrics.keypoint_distance(pred, target) == (5.0 + 0.5, 2)
    assert metrics.embedding_distance(torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])) == 7.0
    assert torch.equal(metrics.quantize(torch.tensor([0.0, 0.5, 1.2])), torch.tensor([0.0, 128 / 255, 1.0]))


def test_landmark_and_identity_models_from_a_path(tmp_path, empty_hub, caplog):
    torch.export.save(torch.export.export(_Landmarks(), (torch.rand(2, 3, 8, 8),)), str(tmp_path / "lm.pt2"))
    model = metrics.load_landmarks(tmp_path / "lm.pt2")
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(model(images), _Landmarks()(images))
    with caplog.at_level(logging.WARNING, logger="fnevr.metrics"):
        assert metrics.load_identity(None) is None
    assert "AED skipped: no identity model" in caplog.text
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(
        ValueError, match=r"identity model .*junk\.pt: neither a torch.export program nor a TorchScript module"
    ):
        metrics.load_identity(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        metrics.load_landmarks(tmp_path / "missing.pt")


def test_landmarks_without_a_model_say_what_is_missing(empty_hub, caplog, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "face_alignment", None)  # not installed
    with caplog.at_level(logging.WARNING, logger="fnevr.metrics"):
        assert metrics.load_landmarks() is None
    assert "AKD skipped: no landmark model" in caplog.text
    caplog.clear()
    monkeypatch.setitem(sys.modules, "face_alignment", types.ModuleType("face_alignment"))  # installed, no weights
    with caplog.at_level(logging.WARNING, logger="fnevr.metrics"):
        assert metrics.load_landmarks() is None
    assert "face-alignment's weights are not in" in caplog.text and "2DFAN4*, s3fd*" in caplog.text


def test_evaluate_reports_akd_and_aed_on_png_frames(tmp_path, capsys):
    import imageio.v3 as iio

    from fnevr.animate import animate
    from fnevr.checkpoint import save_checkpoint
    from fnevr.cli import main
    from fnevr.model import FNeVR
    from fnevr.train.evaluate import evaluate

    torch.manual_seed(0)
    model = FNeVR("small", training_modules=False).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    (tmp_path / "d" / "train").mkdir(parents=True)
    video = torch.randint(0, 256, (3, 64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    video[2] = 0  # a frame without a "face" for the toy landmark model
    clip = tmp_path / "d" / "test" / "clip"  # a frame folder: lossless, so the test can recompute
    clip.mkdir(parents=True)
    for i, frame in enumerate(video):
        iio.imwrite(clip / f"{i:03d}.png", frame.numpy())
    torch.jit.script(_Landmarks()).save(str(tmp_path / "lm.pt"))
    torch.jit.script(_Identity()).save(str(tmp_path / "id.pt"))
    result = evaluate(
        tmp_path / "m.pt",
        tmp_path / "d",
        landmark_model=tmp_path / "lm.pt",
        identity_weights=tmp_path / "id.pt",
        save_png=tmp_path / "png",
    )
    real = video.permute(0, 3, 1, 2).float() / 255
    pred = animate(model, real[0], real, relative=False)
    png, gt = metrics.quantize(pred), metrics.quantize(real)
    total, found = metrics.keypoint_distance(_Landmarks()(png), _Landmarks()(gt))
    assert result["akd_frames"] == found == 2  # the black frame has no face in the real video
    assert result["akd"] == pytest.approx(total / found, rel=1e-6)
    assert result["aed"] == pytest.approx(metrics.embedding_distance(_Identity()(png), _Identity()(gt)) / 3, rel=1e-6)
    strip = torch.as_tensor(iio.imread(tmp_path / "png" / "clip.png"))
    assert strip.shape == (64, 3 * 64, 3)
    assert torch.equal(strip[:, 64:128].permute(2, 0, 1).float() / 255, png[1])
    args = ["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d"), "--device", "cpu"]
    assert (
        main([*args, "--landmark-model", str(tmp_path / "lm.pt"), "--identity-weights", str(tmp_path / "id.pt")]) == 0
    )
    assert "akd=" in capsys.readouterr().out
    assert main([*args, "--identity-weights", str(tmp_path / "none.pt")]) == 2
    assert "--identity-weights" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert main([*args, "--identity-weights", str(tmp_path / "junk.pt")]) == 1
    assert "junk.pt: neither a torch.export program nor a TorchScript module" in capsys.readouterr().err
