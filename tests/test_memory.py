"""Training memory: recomputation (fnevr.nn.recompute), the lean loss ops (fnevr.nn.lean) and
activation checkpointing keep every loss, gradient and running statistic of the plain model, and
keep less for backward (fnevr.train.memory's ledger)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fnevr
from fnevr.config import load_config
from fnevr.data.synthetic import ensure_synthetic_dataset
from fnevr.nn import lean, recompute
from fnevr.train import Trainer, TrainOptions
from fnevr.train.memory import SavedTensorLedger


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "synthetic",
        size=64,
        num_frames=4,
        num_train=4,
        num_test=1,
        clips_per_id=1,
        seed=2,
    )


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random VGG19 weights (fp16 on disk: a smaller file), so the perceptual loss runs VGG19."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    trunk = vgg19(weights=None).features[:30]
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save({k: v.half() for k, v in trunk.state_dict().items()}, path)
    return str(path)


def trainer(data, vgg_file, out, **kw):
    config = load_config("small")
    config["model_params"]["generator_params"]["render_params"]["fused_head"] = "mlp"  # in both: same model
    opts = dict(
        config=config,
        data=str(data),
        out=str(out),
        device="cpu",
        batch_size=2,
        num_workers=0,
        progress=False,
        vgg_weights=vgg_file,
        seed=5,
    )
    opts.update(kw)
    t = Trainer(TrainOptions(**opts))
    for part in t.optimizers:  # SGD: parameter changes are the gradients, scaled
        t.optimizers[part] = torch.optim.SGD(getattr(t.model, part).parameters(), lr=0.1)
    return t


@pytest.mark.parametrize("checkpoint", [False, True], ids=["recompute", "checkpoint-activations"])
def test_memory_saving_keeps_losses_gradients_and_statistics_fp64(data, vgg_file, tmp_path, checkpoint):
    plain = trainer(data, vgg_file, tmp_path / "plain", precision="fp64", memory_saving=False)
    lean_ = trainer(data, vgg_file, tmp_path / "lean", precision="fp64", checkpoint_activations=checkpoint)
    assert plain.perceptual_mode == "vgg" and lean_.recompute and not plain.recompute
    lean_.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(plain._loader(0)))
    for _ in range(2):  # the second step starts from the first step's parameters and statistics
        want, got = plain.train_step([batch]), lean_.train_step([batch])
        assert want.keys() == got.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
    a, b = plain.model.state_dict(), lean_.model.state_dict()
    # Checkpointed blocks hand their parameters' gradients back as outputs, so the three keypoint
    # detector calls add up in another order: fp64 round-off, ~1e-11.
    tol = dict(rtol=1e-8, atol=1e-10) if checkpoint else dict(rtol=1e-10, atol=1e-13)
    for k in a:  # parameters after two SGD steps, running statistics, batch counters
        torch.testing.assert_close(b[k], a[k], **tol, msg=lambda m: f"{k}: {m}")


def torch_grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False, *, backend="auto"):
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def ledger_total(t, batch):
    with SavedTensorLedger(t.model, {t.gen_loss: "", t.disc_loss: ""}) as ledger:
        t.train_step([batch])
    return ledger.total()


def test_the_default_keeps_far_less_for_backward_than_the_published_recipe(data, vgg_file, tmp_path, monkeypatch):
    """The small config at 64x64 (the vox-256 figures: benchmarks/bench_memory.py). Saved bytes
    are exact, not timings, so the bound cannot flake."""
    default = trainer(data, vgg_file, tmp_path / "fnevr")
    bf16 = trainer(data, vgg_file, tmp_path / "bf16", precision="bf16")
    checkpointed = trainer(data, vgg_file, tmp_path / "ckpt", checkpoint_activations=True)
    batch = next(iter(default._loader(0)))
    sizes = {
        name: ledger_total(t, batch) for name, t in (("fnevr", default), ("bf16", bf16), ("checkpoint", checkpointed))
    }
    monkeypatch.setattr(fnevr.ops, "grid_sample", torch_grid_sample)
    published = trainer(data, vgg_file, tmp_path / "published", backend="reference", memory_saving=False)
    published.model.generator.renderer.fused_head = "none"  # the published per-sample MLP
    base = ledger_total(published, batch)
    assert sizes["fnevr"] < 0.65 * base, sizes
    assert sizes["bf16"] < 0.36 * base, sizes
    assert sizes["checkpoint"] < 0.6 * sizes["fnevr"], sizes


def test_recomputed_saves_only_inputs_and_rebuilds_cheap_tensors():
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    bn = torch.nn.BatchNorm2d(8).double()

    def step(memory):
        x.grad = w.grad = None
        with recompute.saving_memory(memory), SavedTensorLedger(bn) as ledger:
            from fnevr.model.blocks import norm_act, upsample2x

            y = norm_act(bn, F.conv2d(x, w, padding=1), pool=True)
            loss = F.conv2d(upsample2x(y), w, padding=1).square().sum()
        loss.backward()
        return loss.detach(), x.grad.clone(), w.grad.clone(), bn.running_mean.clone(), ledger.total()

    plain, lean_ = step(False), step(True)
    assert torch.equal(plain[0], lean_[0]) and torch.equal(plain[1], lean_[1]) and torch.equal(plain[2], lean_[2])
    # kept: x and w (first conv), its output (the norm's input), the second conv's output (square's
    # input); not the norm/ReLU output, the pooled map or the upsampled one (the second conv's input)
    assert lean_[4] == 3 * x.numel() * 8 + w.numel() * 8 < plain[4]


def test_batchnorm_running_statistics_are_updated_once():
    bn = torch.nn.BatchNorm2d(3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    from fnevr.model.blocks import norm_act

    with recompute.saving_memory(checkpoint=True):
        y = recompute.checkpoint_module(torch.nn.Sequential(torch.nn.Identity()), x)  # a module with no parameters
        out = norm_act(bn, y)
    out.sum().backward()
    want = 0.1 * x.detach().mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, want)
    assert bn.num_batches_tracked.item() == 1


def test_a_tensor_changed_in_place_after_forward_is_an_error_not_a_wrong_gradient():
    x = torch.randn(5, requires_grad=True)
    base = torch.randn(5)
    with recompute.saving_memory():
        y = recompute.cheap_call(torch.mul, x, base)
        loss = (y * y).sum()
    base.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_autocast_is_restored_when_recomputing():
    x = torch.randn(4, 16, requires_grad=True)
    w, v = torch.randn(2, 16, 16).unbind(0)
    w.requires_grad_(True)

    def step(memory):
        x.grad = w.grad = None
        with torch.autocast("cpu", torch.bfloat16), recompute.saving_memory(memory):
            h = recompute.recomputed(lambda a, b: torch.relu(a @ b), x, w)  # in bf16, forward and backward
            loss = (h @ v).float().square().sum()
        assert h.dtype == torch.bfloat16
        loss.backward()
        return x.grad.clone(), w.grad.clone()

    for a, b in zip(step(False), step(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("special", [None, "nan", "inf"])
def test_lean_ops_give_pytorchs_gradients(special):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    target = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    if special:
        x[0, 1, 2, 3] = float(special)
        x[1, 0, 5, 5] = -float(special)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double().requires_grad_(False)

    def loss(memory):
        a = x.clone().requires_grad_(True)
        with recompute.saving_memory(memory):
            h = lean.max_pool2x2(lean.relu(lean.frozen_conv2d(a, conv)))
            out = lean.l1_mean(h, F.max_pool2d(target[:, :1].expand(2, 4, 8, 8), 2), torch.float64)
            out = out + lean.l1_mean(lean.relu(a), target, torch.float64)
        out.backward()
        return out.detach(), a.grad

    want, got = loss(False), loss(True)
    torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=1e-14, atol=0)
    torch.testing.assert_close(got[1], want[1], equal_nan=True, rtol=1e-12, atol=1e-15)
    assert torch.equal(got[1].isnan(), want[1].isnan())
    if special is None:
        assert math.isfinite(want[0].item())


def test_outside_saving_memory_the_helpers_are_plain_calls():
    x = torch.randn(3, 4, requires_grad=True)
    y = recompute.recomputed(torch.relu, x)
    assert type(y.grad_fn).__name__ == "ReluBackward0" and not hasattr(y, "_fnevr_recipe")
    assert lean.relu(x).grad_fn.__class__.__name__ == "ReluBackward0"
