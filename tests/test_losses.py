"""Losses: pyramid, VGG19 perceptual (weights by path, hub cache, fallback), LSGAN, feature
matching, random TPS and the equivariance, pose-edit and render L1 losses."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import fnevr.losses.perceptual as perceptual
from fnevr.losses import (
    ImagePyramid,
    PerceptualPyramidLoss,
    RandomTPS,
    VGG19Features,
    equivariance_jacobian_loss,
    equivariance_value_loss,
    feature_matching_loss,
    find_vgg19_weights,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    perceptual_l1,
    pose_edit_loss,
)
from fnevr.losses.perceptual import reachable_layers
from fnevr.losses.pyramid import gaussian_kernel
from fnevr.losses.tps import coordinate_grid


def test_pyramid_shapes_and_blur():
    pyramid = ImagePyramid([1, 0.5, 0.25, 0.125])
    x = torch.rand(2, 3, 64, 48)
    levels = pyramid(x)
    assert list(levels) == ["prediction_1", "prediction_0.5", "prediction_0.25", "prediction_0.125"]
    assert [tuple(v.shape) for v in levels.values()] == [(2, 3, 64, 48), (2, 3, 32, 24), (2, 3, 16, 12), (2, 3, 8, 6)]
    assert levels["prediction_1"] is x
    # Kernel: sigma = (1/s - 1)/2, 2 round(4 sigma) + 1 taps, normalised.
    for scale in (0.5, 0.25, 0.125):
        sigma = (1 / scale - 1) / 2
        k = gaussian_kernel(scale)
        assert k.numel() == 2 * round(4 * sigma) + 1 and abs(k.sum().item() - 1) < 1e-6
        assert torch.allclose(
            k[0] / k[k.numel() // 2], torch.tensor(math.exp(-((k.numel() // 2) ** 2) / (2 * sigma**2)))
        )
    # A constant image stays constant away from the zero-padded border; a checkerboard is averaged out.
    const = pyramid(torch.full((1, 1, 64, 64), 0.7))["prediction_0.25"]
    assert torch.allclose(const[..., 3:-3, 3:-3], torch.tensor(0.7), atol=1e-6)
    board = ((torch.arange(64)[:, None] + torch.arange(64)) % 2).float().view(1, 1, 64, 64)
    assert (pyramid(board)["prediction_0.25"][..., 3:-3, 3:-3] - 0.5).abs().max() < 0.01
    with pytest.raises(ValueError, match="scales"):
        ImagePyramid([2])


@pytest.fixture(scope="module")
def vgg_state():
    """A random-weight VGG19 trunk state dict with torchvision's key names."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    with torch.device("meta"):
        trunk = vgg19(weights=None).features[:30]
    trunk = trunk.to_empty(device="cpu")
    for layer in trunk:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight)
            torch.nn.init.normal_(layer.bias, std=0.01)
    return {f"features.{k}": v.half() for k, v in trunk.state_dict().items()}  # half: a smaller file


@pytest.fixture
def vgg_file(tmp_path, vgg_state):
    path = tmp_path / "vgg19-random.pth"
    torch.save(vgg_state, path)
    return path


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def test_vgg19_features_are_fomm_layers(vgg_file, vgg_state):
    vgg = VGG19Features(vgg_file)
    x = torch.rand(1, 3, 32, 32)
    out = vgg(x)
    assert [tuple(o.shape) for o in out] == [
        (1, 64, 32, 32),
        (1, 128, 16, 16),
        (1, 256, 8, 8),
        (1, 512, 4, 4),
        (1, 512, 2, 2),
    ]
    # relu1_1 and relu2_1 by hand from the saved weights.
    w = {k: v.float() for k, v in vgg_state.items()}
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    h = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    relu1_1 = F.relu(F.conv2d(h, w["features.0.weight"], w["features.0.bias"], padding=1))
    relu1_2 = F.relu(F.conv2d(relu1_1, w["features.2.weight"], w["features.2.bias"], padding=1))
    relu2_1 = F.relu(F.conv2d(F.max_pool2d(relu1_2, 2), w["features.5.weight"], w["features.5.bias"], padding=1))
    torch.testing.assert_close(out[0], relu1_1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], relu2_1, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in vgg.parameters())
    assert not vgg.train().training
    torch.save({"features.0.weight": w["features.0.weight"]}, vgg_file.with_name("partial.pth"))
    with pytest.raises(ValueError, match="missing keys"):
        VGG19Features(vgg_file.with_name("partial.pth"))


def test_perceptual_loss_with_weights_by_path(vgg_file, empty_hub):
    loss_fn = PerceptualPyramidLoss([1, 0.5], [1, 1, 1, 1, 1], vgg_weights=vgg_file)
    assert loss_fn.mode == "vgg"
    x = torch.rand(2, 3, 32, 32)
    y = torch.rand(2, 3, 32, 32)
    pred = x.clone().requires_grad_(True)
    loss = loss_fn(pred, y)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert loss_fn(x, x).item() == 0
    # Layer weights matter: zero weights everywhere but relu1_1 gives a smaller loss.
    only_first = PerceptualPyramidLoss([1, 0.5], [1, 0, 0, 0, 0], vgg_weights=vgg_file)
    assert 0 < only_first(x, y) < loss
    with pytest.raises(FileNotFoundError, match="no file"):
        PerceptualPyramidLoss(vgg_weights=vgg_file.with_name("absent.pth"))


def test_perceptual_loss_on_levels_smaller_than_vgg_needs(vgg_file, empty_hub):
    """Scale 1/8 of 32x32 is 4x4: only relu1_1 ... relu3_1 exist there."""
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    loss = PerceptualPyramidLoss([0.125], [1, 2, 3, 4, 5], vgg_weights=vgg_file)
    small_x, small_y = loss.pyramid(x)["prediction_0.125"], loss.pyramid(y)["prediction_0.125"]
    assert small_x.shape[-1] == 4
    features = [loss.vgg(small_x, 3), loss.vgg(small_y, 3)]
    expected = sum(w * (a - b).abs().mean() for w, a, b in zip([1, 2, 3], *features))
    torch.testing.assert_close(loss(x, y), expected)
    assert [reachable_layers(s, s) for s in (1, 2, 3, 4, 8, 15, 16, 256)] == [1, 2, 2, 3, 4, 4, 5, 5]


def test_perceptual_loss_finds_hub_cache(vgg_state, empty_hub):
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.save(vgg_state, empty_hub / "checkpoints" / "vgg19-dcbb9e9d.pth")
    assert find_vgg19_weights() == empty_hub / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert PerceptualPyramidLoss([1], [1] * 5).mode == "vgg"


def test_perceptual_loss_fallback_message(empty_hub, caplog):
    with caplog.at_level(logging.WARNING, logger=perceptual.__name__):
        loss_fn = PerceptualPyramidLoss([1, 0.5], [10, 10, 10, 10, 10])
    assert loss_fn.mode == "l1" and loss_fn.vgg is None
    message = caplog.text
    assert "VGG19 weights not found" in message and str(empty_hub / "checkpoints" / "vgg19-*.pth") in message
    assert "vgg_weights" in message and "fallback 'l1'" in message
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    levels_x, levels_y = loss_fn.pyramid(x), loss_fn.pyramid(y)
    expected = sum(50 * (levels_x[k] - levels_y[k]).abs().mean() for k in levels_x)
    torch.testing.assert_close(loss_fn(x, y), expected)
    with pytest.raises(FileNotFoundError, match="VGG19 weights not found"):
        PerceptualPyramidLoss(fallback="error")
    with pytest.raises(ValueError, match="fallback"):
        PerceptualPyramidLoss(fallback="zero")
    with pytest.raises(ValueError, match="5 entries"):
        PerceptualPyramidLoss(weights=[1, 1])


def disc_outputs(seed, scales=(1, 0.5), layers=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in scales:
        out[f"prediction_map_{s}"] = torch.randn(2, 1, 4, 4, generator=g)
        out[f"feature_maps_{s}"] = [torch.randn(2, 8, 4, 4, generator=g) for _ in range(layers)]
    return out


def test_lsgan_and_feature_matching_by_hand():
    real, fake = disc_outputs(0), disc_outputs(1)
    r = {k: v.double().numpy() for k, v in real.items() if k.startswith("prediction_map")}
    f = {k: v.double().numpy() for k, v in fake.items() if k.startswith("prediction_map")}
    gen = sum(((1 - f[k]) ** 2).mean() for k in f)
    disc = sum(((1 - r[k]) ** 2).mean() + (f[k] ** 2).mean() for k in f)
    assert abs(lsgan_generator_loss(fake).item() - gen) < 1e-5
    assert abs(lsgan_discriminator_loss(real, fake).item() - disc) < 1e-5
    assert abs(lsgan_generator_loss(fake, scales=[0.5]).item() - ((1 - f["prediction_map_0.5"]) ** 2).mean()) < 1e-5
    weights = [10, 0, 2.5]
    fm = 0.0
    for s in (1, 0.5):
        for w, a, b in zip(weights, real[f"feature_maps_{s}"], fake[f"feature_maps_{s}"]):
            fm += w * (a.double() - b.double()).abs().mean().item()
    assert abs(feature_matching_loss(real, fake, weights).item() - fm) < 1e-4
    # Gradients reach the generated features only.
    fake_grad = {k: [t.requires_grad_(True) for t in v] if isinstance(v, list) else v for k, v in fake.items()}
    real_grad = {k: [t.requires_grad_(True) for t in v] if isinstance(v, list) else v for k, v in real.items()}
    feature_matching_loss(real_grad, fake_grad, weights).backward()
    assert fake_grad["feature_maps_1"][0].grad is not None and real_grad["feature_maps_1"][0].grad is None
    assert fake_grad["feature_maps_1"][1].grad is None  # weight 0: skipped
    with pytest.raises(KeyError, match="prediction_map_"):
        lsgan_generator_loss({"feature_maps_1": []})
    with pytest.raises(KeyError, match=r"0\.25"):
        lsgan_generator_loss(fake, scales=[0.25])


def test_tps_with_zero_sigmas_is_identity():
    tps = RandomTPS(3, sigma_affine=0, sigma_tps=0, points_tps=5)
    frame = torch.rand(3, 2, 9, 13)
    torch.testing.assert_close(tps.transform_frame(frame), frame, rtol=0, atol=1e-5)
    coords = torch.rand(3, 7, 2) * 2 - 1
    torch.testing.assert_close(tps.warp_coordinates(coords), coords)
    torch.testing.assert_close(tps.jacobian(coords), torch.eye(2).expand(3, 7, 2, 2))
    # With TPS weights drawn but zero: still the identity (the TPS term is active).
    tps = RandomTPS(3, sigma_affine=0, sigma_tps=0.01, points_tps=5)
    tps.control_params.zero_()
    torch.testing.assert_close(tps.warp_coordinates(coords), coords)


def test_tps_jacobian_matches_finite_differences():
    tps = RandomTPS(
        2,
        sigma_affine=0.1,
        sigma_tps=0.05,
        points_tps=4,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    coords = torch.rand(2, 5, 2, dtype=torch.float64) * 1.6 - 0.8
    jac = tps.jacobian(coords)
    eps = 1e-6
    for axis in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[axis] = eps
        numeric = (tps.warp_coordinates(coords + step) - tps.warp_coordinates(coords - step)) / (2 * eps)
        torch.testing.assert_close(jac[..., :, axis], numeric, rtol=1e-6, atol=1e-7)
    assert not jac.requires_grad
    assert tps.jacobian(coords.clone().requires_grad_(True)).requires_grad  # differentiable for the loss
    # Affine part is I + noise: not the identity, and a draw is reproducible from its generator.
    assert (jac - torch.eye(2, dtype=torch.float64)).abs().max() > 1e-3
    again = RandomTPS(
        2,
        sigma_affine=0.1,
        sigma_tps=0.05,
        points_tps=4,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert torch.equal(again.theta, tps.theta) and torch.equal(again.control_params, tps.control_params)


def coordinate_image(batch, size, dtype=torch.float64):
    """A frame whose two channels hold each pixel's own (x, y) in [-1, 1]."""
    return coordinate_grid(size, size, dtype=dtype).permute(2, 0, 1).expand(batch, 2, size, size).contiguous()


def test_transform_frame_samples_at_warped_coordinates():
    tps = RandomTPS(
        2,
        sigma_affine=0.05,
        sigma_tps=0.005,
        points_tps=5,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    size = 33
    out = tps.transform_frame(coordinate_image(2, size))
    grid = coordinate_grid(size, size, dtype=torch.float64)
    warped = tps.warp_coordinates(grid.view(1, -1, 2).expand(2, -1, -1)).view(2, size, size, 2)
    inner = slice(8, -8)  # away from the border, where reflection takes over
    # Bilinear sampling of a linear ramp is exact, so out[p] == T(p).
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[:, inner, inner], warped[:, inner, inner], rtol=0, atol=1e-9)


def affine_coordinate_detector(frame, anchors):
    """A perfectly equivariant toy detector for coordinate images: fit frame(p) = A p + b over the
    central pixels and return the points where the frame reads ``anchors``: p = A^-1 (anchor - b),
    with Jacobian A^-1."""
    batch, _, size, _ = frame.shape
    grid = coordinate_grid(size, size, dtype=frame.dtype).view(-1, 2)
    inside = grid.abs().amax(-1) < 0.6
    design = torch.cat([grid[inside], torch.ones(int(inside.sum()), 1, dtype=frame.dtype)], dim=1)
    values, jacobians = [], []
    for b in range(batch):
        target = frame[b].permute(1, 2, 0).reshape(-1, 2)[inside]
        fit = torch.linalg.lstsq(design, target).solution  # [3, 2]
        a, offset = fit[:2].T, fit[2]
        a_inv = torch.linalg.inv(a)
        values.append((anchors - offset) @ a_inv.T)
        jacobians.append(a_inv.expand(anchors.shape[0], 2, 2))
    return {"value": torch.stack(values), "jacobian": torch.stack(jacobians)}


def test_equivariance_losses_vanish_for_an_equivariant_detector():
    tps = RandomTPS(
        2, sigma_affine=0.05, sigma_tps=0, points_tps=5, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    frame = coordinate_image(2, 41)
    anchors = torch.tensor([[0.1, -0.2], [-0.3, 0.25], [0.0, 0.0]], dtype=torch.float64)
    kp_driving = affine_coordinate_detector(frame, anchors)
    kp_transformed = affine_coordinate_detector(tps.transform_frame(frame), anchors)
    torch.testing.assert_close(kp_driving["value"], anchors.expand(2, 3, 2))
    assert equivariance_value_loss(kp_driving, kp_transformed, tps) < 1e-9
    assert equivariance_jacobian_loss(kp_driving, kp_transformed, tps) < 1e-9
    # A detector that ignores the image is not equivariant: both losses see it.
    fixed = {"value": anchors.expand(2, 3, 2), "jacobian": torch.eye(2, dtype=torch.float64).expand(2, 3, 2, 2)}
    assert equivariance_value_loss(kp_driving, fixed, tps) > 1e-3
    assert equivariance_jacobian_loss(kp_driving, fixed, tps) > 1e-3
    # The losses by hand for the fixed detector.
    warped = tps.warp_coordinates(fixed["value"])
    assert torch.isclose(equivariance_value_loss(kp_driving, fixed, tps), (anchors - warped).abs().mean())
    product = torch.linalg.inv(kp_driving["jacobian"]) @ tps.jacobian(fixed["value"])
    assert torch.isclose(
        equivariance_jacobian_loss(kp_driving, fixed, tps), (torch.eye(2, dtype=torch.float64) - product).abs().mean()
    )


def test_equivariance_losses_backpropagate_to_keypoints():
    tps = RandomTPS(2, sigma_affine=0.05, sigma_tps=0.005, points_tps=5)
    value = (torch.rand(2, 4, 2) - 0.5).requires_grad_(True)
    jac = (torch.eye(2) + 0.1 * torch.randn(2, 4, 2, 2)).requires_grad_(True)
    kp = {"value": value, "jacobian": jac}
    loss = equivariance_value_loss(kp, kp, tps) + equivariance_jacobian_loss(kp, kp, tps)
    loss.backward()
    assert value.grad.abs().sum() > 0 and jac.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="jacobian"):
        equivariance_jacobian_loss({"value": value}, kp, tps)


def test_pose_edit_and_render_l1():
    pred, target = torch.zeros(2, 3, 2), torch.full((2, 3, 2), 0.5)
    target[0, 0, 0] = 2.0
    assert torch.isclose(pose_edit_loss(pred, target), torch.tensor((0.5 * 11 + 2.0) / 12))
    assert pose_edit_loss({"value": target}, {"value": target}) == 0
    with pytest.raises(ValueError, match="shape"):
        pose_edit_loss(pred, target[:, :2])
    render = torch.full((2, 3, 8, 8), 0.25)
    assert torch.isclose(perceptual_l1(render, torch.full((2, 3, 32, 32), 0.75)), torch.tensor(0.5))
    target = torch.rand(2, 3, 8, 8)
    assert torch.isclose(perceptual_l1(render, target), (render - target).abs().mean())
    big = torch.rand(1, 3, 32, 32)
    small = F.interpolate(big, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    assert perceptual_l1(small, big) < 1e-6 < perceptual_l1(small.flip(-1), big)
    with pytest.raises(ValueError, match="same"):
        perceptual_l1(render, torch.rand(2, 1, 32, 32))
