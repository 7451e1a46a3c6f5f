"""fnevr.patch, unpatch and patch_functional on modules with the authors' layout
(tests/authors_layout.py): patched equals unpatched (fp64, forward, backward, torch.compile), the
state dict is untouched, unpatch restores, and what does not match is left alone with a warning."""

import copy
import subprocess
import sys
from pathlib import Path

import authors_layout as A
import pytest
import torch
import torch.nn.functional as F
from published_model import generator as published_generator
from test_model import KEYS, random_published_checkpoint
from torch import nn

import fnevr
from fnevr.ops.grid_sample import TORCH_GRID_SAMPLE

pytestmark = pytest.mark.filterwarnings("ignore:Default grid_sample")  # the authors' calls leave align_corners unset

# Backends the whole small generator runs on here (the Triton interpreter is tested per op).
BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("reference", "cpu", id="reference"),
    *[
        pytest.param(
            b, "cuda", id=f"{b}-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
        )
        for b in ("cuda", "triton")
    ],
]
PATCHED = {
    "": "grid_sample -> fnevr.ops.grid_sample in deform_input",
    "dense_motion_network": "grid_sample -> fnevr.ops.grid_sample in create_deformed_source_image",
    "Render_model": "mlp_composite",
    **{f"decoder.SPADE_{i}": "spade_norm with the ReLUs fused (SPADE_0, SPADE_1 included)" for i in range(4)},
}


def _randomise_batchnorms(model, gen):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return model


def small_generator(dtype=torch.float64, device="cpu"):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = A.OcclusionAwareGenerator_SPADE(**A.SMALL)
    model.Render_model.nerf_module.layer3_1.bias.data += 0.5  # some densities positive: compositing matters
    return _randomise_batchnorms(model, torch.Generator().manual_seed(1)).to(device, dtype)


def generator_inputs(device="cpu", batch=2, size=64, num_kp=4):
    gen = torch.Generator().manual_seed(2)
    dtype = torch.float64

    def keypoints():
        value = torch.rand(batch, num_kp, 2, generator=gen, dtype=dtype) * 1.6 - 0.8
        jacobian = torch.eye(2, dtype=dtype) + 0.1 * torch.randn(batch, num_kp, 2, 2, generator=gen, dtype=dtype)
        return {"value": value.to(device), "jacobian": jacobian.to(device)}

    source = torch.rand(batch, 3, size, size, generator=gen, dtype=dtype).to(device)
    return source, keypoints(), keypoints()


OUTPUTS = ("prediction", "deformed", "render", "mask", "sparse_deformed", "occlusion_map")


def outputs_and_grads(model, source, kp_driving, kp_source):
    """Every output of one forward and every parameter's gradient of a loss that uses them all."""
    out = model(source, kp_driving=kp_driving, kp_source=kp_source)
    flat = [out[k] for k in OUTPUTS] + [out["point_pred"]["sigma_map"]]
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum() for o in flat)
    return flat, torch.autograd.grad(loss, list(model.parameters()))


def assert_same(a, b, tol, what):
    """Outputs each within tol of its largest value; gradients within tol of the largest of all
    (a parameter before a norm has a gradient of zero up to round-off)."""
    (out_a, grad_a), (out_b, grad_b) = a, b
    for name, x, y in zip(OUTPUTS + ("sigma_map",), out_a, out_b, strict=True):
        err = ((x - y).abs().max() / y.abs().max()).item()
        assert err <= tol, f"{what}: output {name} differs by {err:.2e} of its largest value"
    scale = max(g.abs().max().item() for g in grad_b)
    for k, (x, y) in enumerate(zip(grad_a, grad_b, strict=True)):
        err = (x - y).abs().max().item() / scale
        assert err <= tol, f"{what}: gradient {k} differs by {err:.2e} of the largest gradient"


# --- the layout is the authors' ------------------------------------------------------------------


def test_layout_has_the_published_keys_and_computes_the_published_forward():
    generator, detector = A.OcclusionAwareGenerator_SPADE(**A.VOX256), A.KPDetector(**A.VOX256_KP)
    for name, model in (("generator", generator), ("kp_detector", detector)):
        assert {k: list(t.shape) for k, t in model.state_dict().items()} == KEYS[name], name
    ckpt = random_published_checkpoint()
    generator.load_state_dict(ckpt["generator"])
    detector.load_state_dict(ckpt["kp_detector"])
    generator.eval(), detector.eval()
    source, driving = torch.rand(2, 1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kp_source, kp_driving = detector(source), detector(driving)
        ours = generator(source, kp_driving, kp_source)
        theirs = published_generator(ckpt["generator"], source, kp_driving, kp_source)
    for key in ("prediction", "deformed", "occlusion_map", "mask", "sparse_deformed"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4, msg=key)
    torch.testing.assert_close(ours["render"], theirs["mini_render"], rtol=1e-4, atol=1e-4)


# --- patched equals unpatched --------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_patched_equals_unpatched_fp64(backend, device, training):
    model = small_generator(device=device).train(training)
    twin = copy.deepcopy(model)
    report = fnevr.patch(twin, backend=backend)
    assert report.patched == PATCHED and not report.skipped, str(report)
    inputs = generator_inputs(device=device)
    assert_same(outputs_and_grads(twin, *inputs), outputs_and_grads(model, *inputs), 1e-9, backend)
    for (name, a), b in zip(twin.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)  # running statistics alike


def test_patched_runs_under_torch_compile_without_graph_breaks():
    model = small_generator()
    twin = copy.deepcopy(model)
    fnevr.patch(twin)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    inputs = generator_inputs()
    assert_same(outputs_and_grads(compiled, *inputs), outputs_and_grads(model, *inputs), 1e-9, "compiled")


def test_patched_inference_fp32_within_round_off():
    """No gradients: the SPADE layers take the low-resolution conv, the dense motion's 3-channel warps
    may run PyTorch's op (fnevr.ops.grid_sample's rule); against the unpatched fp64 model."""
    model = small_generator().eval()
    twin = copy.deepcopy(model).float()
    fnevr.patch(twin)
    source, kp_driving, kp_source = generator_inputs()
    single = [source.float()] + [{k: v.float() for k, v in kp.items()} for kp in (kp_driving, kp_source)]
    with torch.no_grad():
        expected = model(source, kp_driving, kp_source)
        actual = twin(*single)
    for key in OUTPUTS:
        err = ((actual[key].double() - expected[key]).abs().max() / expected[key].abs().max()).item()
        assert err <= 1e-4, f"{key}: {err:.2e}"


def test_patched_under_bf16_autocast_is_as_close_to_fp32_as_unpatched():
    model = small_generator(torch.float32)
    twin = copy.deepcopy(model)
    fnevr.patch(twin)
    source, kp_driving, kp_source = generator_inputs()
    single = [source.float()] + [{k: v.float() for k, v in kp.items()} for kp in (kp_driving, kp_source)]
    expected = model(*single)
    outputs = {}
    for name, m in (("unpatched", model), ("patched", twin)):
        with torch.autocast("cpu", torch.bfloat16):
            outputs[name] = m(*single)
        sum(outputs[name][k].float().square().mean() for k in OUTPUTS).backward()
    for key in OUTPUTS:
        assert outputs["patched"][key].dtype == outputs["unpatched"][key].dtype, key
        err = {
            n: ((o[key].float() - expected[key]).abs().max() / expected[key].abs().max()).item()
            for n, o in outputs.items()
        }
        assert err["patched"] <= 1.5 * err["unpatched"] + 1e-2, f"{key}: {err}"
    assert all(p.grad is not None and p.grad.isfinite().all() for p in twin.parameters())


# --- the model itself is untouched ---------------------------------------------------------------


def test_state_dict_unpatch_context_and_copies():
    model = small_generator().eval()  # running statistics stay as they are
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = generator_inputs()
    expected = model(*inputs)["prediction"]

    with fnevr.patch(model) as report:
        assert len(report.patched) == 7
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        fresh = small_generator().eval()
        fresh.load_state_dict(model.state_dict())  # the patched model's state dict loads unpatched
        model.load_state_dict(state)  # and the other way round
        assert fnevr.patch(model).patched == {}  # patched modules are left as they are, without a warning
        clone = copy.deepcopy(model)
        layer = clone.decoder.SPADE_0.SPADE_1
        assert vars(layer)["forward"].args[0] is layer  # the copy's forward runs the copy
        torch.testing.assert_close(clone(*inputs)["prediction"], expected, rtol=1e-9, atol=1e-12)
        assert fnevr.unpatch(clone) == 15  # generator, dense motion, renderer, 4 SPADE blocks and their 8 layers
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
    assert fnevr.unpatch(model) == 0
    assert torch.equal(model(*inputs)["prediction"], expected)


# --- what does not match -------------------------------------------------------------------------


class ScaledSPADE(A.SPADE_layer):
    """The authors' attributes, another computation: out = norm(x) * gamma + beta."""

    def forward(self, x, modulation_in):
        actv = self.mlp_shared(F.interpolate(modulation_in, size=x.shape[2:], mode="nearest"))
        return self.param_free_norm(x) * self.mlp_gamma(actv) + self.mlp_beta(actv)


class AffineSPADE(A.SPADE_layer):
    def __init__(self, norm_channel, label_channel):
        super().__init__(norm_channel, label_channel)
        self.param_free_norm = nn.InstanceNorm2d(norm_channel, affine=True)


class TorchWarp(nn.Module):
    """Reaches grid_sample through `torch.`, which patch cannot rebind."""

    def forward(self, x, grid):
        return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def test_unknown_structures_are_left_alone_with_a_warning():
    plain = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU())
    with pytest.warns(fnevr.PatchWarning, match="nothing in Sequential matched .* the model is unchanged"):
        report = fnevr.patch(plain)
    assert report.patched == {} and not any("_fnevr_patched" in vars(m) for m in plain.modules())

    model = nn.ModuleDict({"scaled": ScaledSPADE(8, 4), "affine": AffineSPADE(8, 4), "warp": TorchWarp()})
    with pytest.warns(fnevr.PatchWarning, match="left 3 module"):
        report = fnevr.patch(model)
    assert "does not compute what spade_norm does" in report.skipped["scaled"]
    assert "param_free_norm is not InstanceNorm2d(affine=False" in report.skipped["affine"]
    assert "patch_functional" in report.skipped["warp"]
    assert report.patched == {} and not any("forward" in vars(m) for m in model.modules())


class RenamedMLP(nn.Module):
    """The published per-sample MLP under other names: only the compositing can be fused."""

    def __init__(self, mlp):
        super().__init__()
        self.body = mlp

    def forward(self, rgb_in, sigma_in):
        return self.body(rgb_in, sigma_in)


def test_renderer_with_another_mlp_composites_through_fnevr():
    render = small_generator().Render_model
    render.nerf_module = RenamedMLP(render.nerf_module)
    twin = copy.deepcopy(render)
    report = fnevr.patch(twin)
    assert report.patched == {"": "volume_render -> fnevr.ops.composite"}
    feature = torch.rand(2, 256, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for m in (twin, render):
        out = m(feature)
        flat = [out["render"], out["mini_pred"], out["point_pred"]["sigma_map"]]
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in flat)
        results.append(flat + list(torch.autograd.grad(loss, list(m.parameters()))))
    for k, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"output or gradient {k}")


class SynchronizedBatchNorm2d(nn.modules.batchnorm._BatchNorm):
    """Like the authors' bundled class: its own forward (which syncs only inside DataParallel and
    counts no batches), and a rank check that ends in _BatchNorm's, which raises."""

    calls = 0

    def __init__(self, num_features):
        super().__init__(num_features)
        self._is_parallel = False

    def _check_input_dim(self, input):
        super()._check_input_dim(input)

    def forward(self, x):
        type(self).calls += 1
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )


def small_detector():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = A.KPDetector(**dict(A.VOX256_KP, num_kp=4, max_features=64, num_blocks=3, block_expansion=8))
    block = model.predictor.encoder.down_blocks[0]
    block.norm = SynchronizedBatchNorm2d(block.norm.num_features)
    return _randomise_batchnorms(model, torch.Generator().manual_seed(1)).double()


@pytest.mark.parametrize("backend,device", BACKENDS[:2])
def test_batchnorm_on_request(backend, device):
    model = small_detector()
    with pytest.warns(fnevr.PatchWarning, match="nothing in KPDetector matched"):
        fnevr.patch(model)  # nothing else in a keypoint detector
    twin = copy.deepcopy(model)
    report = fnevr.patch(twin, batchnorm=True, backend=backend)
    norms = [n for n, m in twin.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert set(report.patched) == set(norms) and len(norms) == 6
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for training in (True, False):
        model.train(training), twin.train(training)
        ours, theirs = twin(image), model(image)
        for key in ("value", "jacobian"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-12)
        grads = [
            torch.autograd.grad(out["jacobian"].sum(), list(m.parameters()))
            for m, out in ((twin, ours), (model, theirs))
        ]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(twin.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=name)  # running statistics, batch counts
    twin.train()
    norm = twin.predictor.encoder.down_blocks[0].norm
    SynchronizedBatchNorm2d.calls, norm._is_parallel = 0, True
    twin(image)
    assert SynchronizedBatchNorm2d.calls == 1  # inside DataParallel its own forward (and sync) runs


# --- any code: torch.nn.functional.grid_sample ---------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch):
    """How many calls reached fnevr.ops.grid_sample through the patches."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return fnevr.ops.grid_sample(*args, **kwargs)

    monkeypatch.setattr(fnevr.dropin, "fused_grid_sample", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_functional_gives_pytorchs_results(dtype, fused_calls):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 9, generator=gen, dtype=dtype, requires_grad=True)
    grid = (torch.rand(2, 5, 6, 2, generator=gen, dtype=dtype) * 2.4 - 1.2).requires_grad_()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    with fnevr.patch_functional() as handle:
        assert F.grid_sample is not TORCH_GRID_SAMPLE and handle.active
        for mode in ("bilinear", "nearest"):
            for padding in ("zeros", "border", "reflection"):
                for align in (None, False, True):
                    args = (x, grid, mode, padding, align)
                    ours = F.grid_sample(*args)
                    theirs = TORCH_GRID_SAMPLE(*args)
                    torch.testing.assert_close(ours, theirs, **tol)
                    g_ours = torch.autograd.grad(ours.square().sum(), (x, grid))
                    g_theirs = torch.autograd.grad(theirs.square().sum(), (x, grid))
                    for a, b in zip(g_ours, g_theirs):
                        torch.testing.assert_close(a, b, **tol)
        assert len(fused_calls) == 18
        volume = torch.rand(1, 2, 3, 4, 5, dtype=dtype)
        grid3 = torch.rand(1, 2, 2, 2, 3, dtype=dtype) * 2 - 1
        assert torch.equal(
            F.grid_sample(volume, grid3, align_corners=False), TORCH_GRID_SAMPLE(volume, grid3, align_corners=False)
        )
        bicubic = dict(mode="bicubic", align_corners=False)
        assert torch.equal(F.grid_sample(x, grid, **bicubic), TORCH_GRID_SAMPLE(x, grid, **bicubic))
        assert len(fused_calls) == 18  # those two went to PyTorch's op
        with torch.no_grad():  # fnevr's rule that runs PyTorch's op must reach PyTorch's, not recurse
            images = torch.rand(torch.get_num_threads(), 3, 8, 8, dtype=dtype)
            warp = torch.rand(images.shape[0], 4, 4, 2, dtype=dtype) * 2 - 1
            torch.testing.assert_close(
                fnevr.ops.grid_sample(images, warp), TORCH_GRID_SAMPLE(images, warp, align_corners=False)
            )
    assert F.grid_sample is TORCH_GRID_SAMPLE and not handle.active


def test_patch_functional_nests_and_undoes_once():
    outer = fnevr.patch_functional()
    try:
        with fnevr.patch_functional():
            assert F.grid_sample is not TORCH_GRID_SAMPLE
        assert F.grid_sample is not TORCH_GRID_SAMPLE  # the outer one is still active
    finally:
        outer.undo()
    assert F.grid_sample is TORCH_GRID_SAMPLE
    outer.undo()  # again: nothing to do
    assert F.grid_sample is TORCH_GRID_SAMPLE


def test_patch_functional_reaches_what_patch_cannot(fused_calls):
    """patch cannot rebind `torch.nn.functional.grid_sample` reached through `torch`;
    patch_functional can, with the same result."""
    module = TorchWarp()
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    grid = torch.rand(1, 3, 3, 2, dtype=torch.float64) * 2 - 1
    expected = module(x, grid)
    with fnevr.patch_functional():
        actual = module(x, grid)
    assert fused_calls == [x.shape]
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_patched_warps_run_fnevrs_op(fused_calls):
    model = small_generator()
    fnevr.patch(model)
    model(*generator_inputs())
    # the dense motion's K + 1 source warps, the feature warp, the source warp
    assert fused_calls == [(2 * 5, 3, 16, 16), (2, 256, 16, 16), (2, 3, 64, 64)]


# --- bad input, and the benchmark ----------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        fnevr.patch("generator")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        fnevr.patch(nn.Linear(2, 2), backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu tensors"):
            fnevr.patch(nn.Linear(2, 2), backend="cuda")


def test_benchmark_runs():
    script = Path(__file__).parent.parent / "benchmarks" / "bench_patch.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| fnevr.patch |" in result.stdout and "7 replaced, 0 not" in result.stdout
