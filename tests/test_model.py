"""The FNeVR model: shapes through every module, fused backends against the reference, published
checkpoints (random weights in the published layout) against an independent functional statement
of the published forward pass, our checkpoint format, and the error paths."""

import json
from pathlib import Path

import pytest
import torch
from published_model import generator as published_generator
from published_model import keypoints as published_keypoints

import fnevr
from fnevr.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from fnevr.model import FNeVR
from helpers import target_params

KEYS = json.loads((Path(__file__).parent / "data" / "published_vox256_keys.json").read_text())


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def random_published_checkpoint(seed=0):
    """Random tensors for every published key, scaled so activations stay O(1) and the densities
    are positive for some samples (so compositing is exercised)."""
    g = torch.Generator().manual_seed(seed)
    ckpt = {}
    for net in ("generator", "kp_detector"):
        sd = {}
        for key, shape in KEYS[net].items():
            if key.endswith("num_batches_tracked"):
                sd[key] = torch.tensor(7)
            elif key.endswith("down.weight"):  # the anti-alias kernel: positive, sums to one per channel
                k = torch.rand(shape, generator=g) + 0.5
                sd[key] = k / k.sum(dim=(2, 3), keepdim=True)
            elif key.endswith("running_var"):
                sd[key] = torch.rand(shape, generator=g) + 0.5
            elif key.endswith("running_mean"):
                sd[key] = 0.1 * torch.randn(shape, generator=g)
            elif len(shape) > 1:  # conv / linear weights
                fan_in = torch.tensor(shape[1:]).prod().item()
                sd[key] = torch.randn(shape, generator=g) / fan_in**0.5
            elif "norm" in key or ".res_conv3d.1." in key or ".res_conv3d.3." in key or ".res_conv3d.5." in key:
                sd[key] = (
                    (1.0 + 0.1 * torch.randn(shape, generator=g))
                    if key.endswith("weight")
                    else 0.1 * torch.randn(shape, generator=g)
                )
            else:  # biases
                sd[key] = 0.1 * torch.randn(shape, generator=g)
        ckpt[net] = sd
    ckpt["generator"]["Render_model.nerf_module.layer3_1.bias"] += 0.5
    return ckpt


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    ckpt = random_published_checkpoint()
    path = tmp_path_factory.mktemp("ckpt") / "00000099-checkpoint.pth.tar"
    torch.save(ckpt, path)
    return path, ckpt


def frames(B, size, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, B, 3, size, size, generator=g).to(dtype).unbind(0)


@pytest.mark.parametrize("backend, dtype, tol", [("reference", torch.float64, 1e-12), ("auto", torch.float32, 2e-4)])
def test_published_checkpoint_matches_published_forward(published, backend, dtype, tol):
    path, ckpt = published
    model, extra = load_checkpoint(path, "vox-256")
    assert extra == {} and model.discriminator is None
    model.set_backend(backend).to(dtype)
    sd = {net: {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt[net].items()} for net in ckpt}
    source, driving = frames(1, 256, dtype=dtype)
    with torch.no_grad():
        out = model(source, driving)
        kp_s, kp_d = published_keypoints(sd["kp_detector"], source), published_keypoints(sd["kp_detector"], driving)
        want = published_generator(sd["generator"], source, kp_d, kp_s)
    assert rel_err(out["kp_source"]["value"], kp_s["value"]) <= tol
    assert rel_err(out["kp_driving"]["jacobian"], kp_d["jacobian"]) <= tol
    for key in (
        "prediction",
        "render",
        "mini_render",
        "deformation",
        "occlusion_map",
        "mask",
        "sparse_deformed",
        "deformed",
    ):
        assert out[key].shape == want[key].shape, key
        assert out[key].dtype == dtype, key
        assert rel_err(out[key], want[key]) <= tol, f"{key}: {rel_err(out[key], want[key]):.3g}"
    assert out["render"].std() > 1e-3, "degenerate test: every density was zero"
    assert out["prediction"].shape == (1, 3, 256, 256)
    assert out["shape_volume"].shape == (1, 16, 8, 64, 64)


def test_published_layout_has_every_parameter_of_the_model():
    model = FNeVR("vox-256", training_modules=False)
    state = model.state_dict()
    assert len(state) == len(KEYS["generator"]) + len(KEYS["kp_detector"]) == 330
    assert sum(p.numel() for p in model.generator.parameters()) == pytest.approx(47.2e6, rel=0.01)


def test_mismatched_checkpoint_lists_missing_unexpected_and_misshaped(published, tmp_path):
    _, ckpt = published
    bad = {net: dict(sd) for net, sd in ckpt.items()}
    del bad["generator"]["decoder.final.0.bias"]
    bad["generator"]["decoder.extra.weight"] = torch.zeros(1)
    bad["kp_detector"]["kp.weight"] = torch.zeros(5, 35, 7, 7)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tmp_path / "bad.pth", "vox-256")
    msg = str(e.value)
    assert "missing (1)" in msg and "generator.decoder.to_rgb.bias" in msg
    assert "unexpected (1)" in msg and "generator.decoder.extra.weight" in msg
    assert (
        "misshaped (1)" in msg
        and "kp_detector.heatmap_head.weight: checkpoint (5, 35, 7, 7), model (10, 35, 7, 7)" in msg
    )


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        load_checkpoint(tmp_path / "nowhere.pth", "small")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth could not be read"):
        load_checkpoint(tmp_path / "junk.pth", "small")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth is neither"):
        load_checkpoint(tmp_path / "other.pth", "small")
    torch.save({"generator": {}, "kp_detector": {}}, tmp_path / "published.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)published.pth does not fit.*missing \(330\)"):
        load_checkpoint(tmp_path / "published.pth")  # the published format defaults to vox-256


def test_our_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = FNeVR("small")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "run" / "ckpt.pt", model, step=12, training={"note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary left behind
    loaded, extra = load_checkpoint(path)
    assert extra["step"] == 12 and extra["training"] == {"note": "x"} and loaded.discriminator is not None
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    source, driving = frames(1, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(source, driving)["prediction"], loaded(source, driving)["prediction"])


def test_shapes_through_every_module():
    # vox-256 shapes: test_published_checkpoint_matches_published_forward
    model, size = FNeVR("small").eval(), 64
    m = model.config["model_params"]
    K, D = m["common_params"]["num_kp"], m["generator_params"]["render_params"]["floor_num"]
    source, _ = frames(1, size)
    with torch.no_grad():
        kp = model.kp_detector(source)
        assert kp["value"].shape == (1, K, 2) and kp["jacobian"].shape == (1, K, 2, 2)
        feats = model.generator.encode(source)
        C, h = feats.shape[1], feats.shape[2]
        assert h == size // 4
        motion = model.generator.dense_motion(source, kp_driving=kp, kp_source=kp)
        hm = motion["deformation"].shape[1]
        assert motion["deformation"].shape == (1, hm, hm, 2) and motion["mask"].shape == (1, K + 1, hm, hm)
        assert motion["sparse_deformed"].shape == (1, K + 1, 3, hm, hm)
        color, shape, _ = model.generator.renderer.ray_sampler(feats)
        assert color.shape[:4] == shape.shape[:4] == (1, h, h, D)
        r = model.generator.renderer(feats)
        assert r["render"].shape == (1, C, h, h) and r["mini_render"].shape == (1, 3, size, size)
        assert model.generator.decoder(torch.cat([feats, r["render"]], 1)).shape == (1, 3, size, size)
        # identical keypoints: the identity motion, so the warp reproduces the (downsampled) source
        assert motion["deformation"].abs().max() <= 1.0 + 1e-5
        d = model.discriminator({"prediction_1": source})
        assert d["prediction_map_1"].shape[:2] == (1, 1)
        assert len(d["feature_maps_1"]) == m["discriminator_params"]["num_blocks"]
        edited = model.pose_editor(kp, torch.zeros(1, 3))
        assert torch.equal(edited["value"], kp["value"]) and torch.equal(edited["jacobian"], kp["jacobian"])


def _forward_backward(model, source, driving):
    model.zero_grad(set_to_none=True)
    out = model(source, driving)
    loss = sum(
        (out[k] * torch.linspace(0.5, 1.5, out[k].numel(), dtype=out[k].dtype).view_as(out[k])).sum()
        for k in ("prediction", "mini_render", "deformed")
    )
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _errors(model, ref_grads, ref_out, source, driving):
    """Relative errors of outputs and of every parameter gradient against fp64 reference results.
    Gradients that are zero in exact arithmetic (a conv bias right before a BatchNorm) hold
    round-off only, so each is measured against a floor of 1e-3 x the largest gradient."""
    out, grads = _forward_backward(model, source, driving)
    assert grads.keys() == ref_grads.keys()
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    errs = {
        k: rel_err(out[k], ref_out[k]) for k in ("prediction", "render", "mini_render", "deformed", "occlusion_map")
    }
    for name, g in grads.items():
        errs[name] = (g.double() - ref_grads[name]).abs().max().item() / max(ref_grads[name].abs().max().item(), floor)
    return errs


@pytest.mark.gpu_heavy  # fp64: every Triton kernel compiled once more
@pytest.mark.parametrize(
    "backend, device", target_params([("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")])
)
def test_fused_backends_match_reference(backend, device):
    """Training-mode forward and every parameter gradient of the small model, in fp64, against
    the same model on the reference ops."""
    torch.manual_seed(0)
    model = FNeVR("small", training_modules=False).train()
    ref = FNeVR("small", training_modules=False).train()
    ref.load_state_dict(model.state_dict())
    ref.set_backend("reference").to(device, torch.float64)
    source, driving = (f.to(device) for f in frames(2, 64, seed=3, dtype=torch.float64))
    ref_out, ref_grads = _forward_backward(ref, source, driving)
    errs = _errors(model.set_backend(backend).to(device, torch.float64), ref_grads, ref_out, source, driving)
    bad = {k: f"{v:.3g}" for k, v in errs.items() if not v <= 1e-9}
    assert not bad, bad


def test_set_backend_reaches_every_fused_op_and_rejects_unknown():
    model = FNeVR("small")
    model.set_backend("reference")
    users = [m for m in model.modules() if hasattr(m, "ops_backend")]
    assert len(users) == 3 + 8 and all(m.ops_backend == "reference" for m in users)
    with pytest.raises(ValueError, match="backend must be"):
        model.set_backend("fast")


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled config"):
        FNeVR("vox-512")
    (tmp_path / "x.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match="no 'model_params'"):
        FNeVR(str(tmp_path / "x.yaml"))


def test_pose_editor_rejects_bad_angles():
    model = FNeVR("small")
    kp = {"value": torch.zeros(2, 10, 2), "jacobian": torch.eye(2).expand(2, 10, 2, 2)}
    with pytest.raises(ValueError, match=r"angles must be \[B, 3\]"):
        model.pose_editor(kp, torch.zeros(2, 2))
    assert fnevr.model.PoseEditor is type(model.pose_editor)


@pytest.mark.gpu_heavy  # fp64
@pytest.mark.parametrize("head", ["hidden", "mlp"])
@pytest.mark.parametrize(
    "backend, device",
    target_params([("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]),
)
def test_fused_head_equals_the_unfused_model(backend, device, head):
    """Compositing the hidden features and applying the last layer per ray (render fused_head: hidden),
    or the whole MLP and compositing as one op (fused_head: mlp), gives the unfused model's outputs
    and parameter gradients, in fp64."""
    config = fnevr.load_config("small")
    torch.manual_seed(1)
    plain = FNeVR(config, training_modules=False).train()
    config["model_params"]["generator_params"]["render_params"]["fused_head"] = head
    fused = FNeVR(config, training_modules=False).train()
    fused.load_state_dict(plain.state_dict())
    for m in (plain, fused):
        m.set_backend(backend).to(device, torch.float64)
    source, driving = (f.to(device) for f in frames(2, 64, seed=5, dtype=torch.float64))
    want, want_grads = _forward_backward(plain, source, driving)
    errs = _errors(fused, want_grads, want, source, driving)
    bad = {k: f"{v:.3g}" for k, v in errs.items() if not v <= 1e-9}
    assert not bad, bad
    assert want["render"].std() > 1e-3


@pytest.mark.parametrize(
    "backend, device", target_params([("reference", "cpu"), ("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda")])
)
def test_bf16_autocast(backend, device):
    """Under bf16 autocast the features are bf16 while motion fields may stay fp32: the warps
    promote as PyTorch's grid_sample does, and the result stays close to the fp32 model's."""
    torch.manual_seed(0)
    model = FNeVR("small", training_modules=False).eval().set_backend(backend).to(device)
    source, driving = (f.to(device) for f in frames(2, 64, seed=7))
    with torch.no_grad():
        want = model(source, driving)["prediction"]
        with torch.autocast(device, dtype=torch.bfloat16):
            got = model(source, driving)["prediction"]
    assert got.isfinite().all()
    assert (got.float() - want).abs().mean() < 0.02


@pytest.mark.parametrize("value, head", [(False, "none"), (True, "hidden"), ("mlp", "mlp"), ("none", "none")])
def test_fused_head_reads_names_and_the_booleans_of_older_configs(value, head):
    config = fnevr.load_config("small")
    config["model_params"]["generator_params"]["render_params"]["fused_head"] = value
    assert FNeVR(config, training_modules=False).generator.renderer.fused_head == head


def test_an_unknown_fused_head_is_refused_with_the_choices():
    config = fnevr.load_config("small")
    config["model_params"]["generator_params"]["render_params"]["fused_head"] = "fastest"
    with pytest.raises(ValueError, match=r"fused_head must be one of \('none', 'hidden', 'mlp'\).*got 'fastest'"):
        FNeVR(config, training_modules=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("padding", [1, 0], ids=["same-3x3x3", "valid"])
def test_conv3d_matches_pytorchs_at_batch_one(dtype, padding):
    """fnevr's Conv3d (oneDNN's kernels on CPU fp32, with its own backward for 3x3x3 "same";
    PyTorch's own path for fp64) gives nn.Conv3d's outputs and gradients, with the same state dict."""
    from fnevr.nn.conv3d import Conv3d

    torch.manual_seed(0)
    ours = Conv3d(4, 5, 3, padding=padding).to(dtype)
    theirs = torch.nn.Conv3d(4, 5, 3, padding=padding).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 3, 6, 7, dtype=dtype)
    grads = []
    for conv in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        grads.append((out, xi.grad, conv.weight.grad, conv.bias.grad))
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), *grads):
        assert rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 1e-12), name


def test_channels_last_model_matches_nchw():
    torch.manual_seed(0)
    model = fnevr.FNeVR("small", training_modules=False).eval()
    source, driving = frames(1, 64)
    with torch.no_grad():
        want = model(source, driving)["prediction"]
        got = model.channels_last()(source, driving)["prediction"]
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) <= 1e-4
