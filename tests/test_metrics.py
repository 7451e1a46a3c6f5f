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
