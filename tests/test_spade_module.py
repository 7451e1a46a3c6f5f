"""fnevr.nn.SPADE: loads state dicts with the published model's key names and matches a plain
PyTorch SPADE layer (written here) in fp64, for instance and batch norm, forward and backward."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnevr
from helpers import assert_close

PUBLISHED = os.path.join(os.path.dirname(__file__), "data", "published_vox256_keys.json")
BACKENDS = ["reference", "cpu", "triton"]


class PlainSPADE(nn.Module):
    """What the published code computes, in plain PyTorch."""

    def __init__(self, norm_channels, label_channels, hidden, norm):
        super().__init__()
        self.param_free_norm = (
            nn.InstanceNorm2d(norm_channels, affine=False)
            if norm == "instance"
            else nn.BatchNorm2d(norm_channels, affine=False)
        )
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_channels, 3, padding=1)

    def forward(self, x, segmap):
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.size()[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def random_state_dict(C, L, hidden, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.2
    sd = {
        "mlp_shared.0.weight": rand(hidden, L, 3, 3),
        "mlp_shared.0.bias": rand(hidden),
        "mlp_gamma.weight": rand(C, hidden, 3, 3),
        "mlp_gamma.bias": rand(C),
        "mlp_beta.weight": rand(C, hidden, 3, 3),
        "mlp_beta.bias": rand(C),
    }
    if norm == "batch":
        sd.update(
            {
                "param_free_norm.running_mean": rand(C),
                "param_free_norm.running_var": rand(C).abs() + 0.5,
                "param_free_norm.num_batches_tracked": torch.tensor(7),
            }
        )
    return sd


def test_state_dict_keys_and_shapes_match_the_published_spade_layers():
    with open(PUBLISHED) as f:
        published = json.load(f)["generator"]
    prefixes = sorted({k.rsplit(".mlp_", 1)[0] for k in published if ".mlp_shared." in k})
    assert len(prefixes) == 8, prefixes  # the decoder's eight SPADE layers
    for prefix in prefixes:
        want = {k[len(prefix) + 1 :]: v for k, v in published.items() if k.startswith(prefix + ".")}
        C, hidden = want["mlp_gamma.weight"][:2]
        layer = fnevr.nn.SPADE(C, want["mlp_shared.0.weight"][1], hidden)
        got = {k: list(v.shape) for k, v in layer.state_dict().items()}
        assert got == want, prefix


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_plain_spade_fp64(backend, norm, training):
    if fnevr.ops.backends("cpu")[backend] != "available":
        pytest.skip(fnevr.ops.backends("cpu")[backend])
    C, L, hidden = 6, 5, 8
    sd = random_state_dict(C, L, hidden, norm)
    ours = fnevr.nn.SPADE(C, L, hidden, norm=norm, backend=backend).double()
    plain = PlainSPADE(C, L, hidden, norm).double()
    ours.load_state_dict(sd, strict=True)
    plain.load_state_dict(sd, strict=True)
    ours.train(training), plain.train(training)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, 8, 6, generator=g, dtype=torch.float64)
    segmap = torch.randn(2, L, 4, 3, generator=g, dtype=torch.float64)
    grad_y = torch.randn(2, C, 8, 6, generator=g, dtype=torch.float64)
    outs = []
    for layer in (ours, plain):
        xi, si = x.clone().requires_grad_(), segmap.clone().requires_grad_()
        y = layer(xi, si)
        y.backward(grad_y)
        outs.append(
            (
                y,
                xi.grad,
                si.grad,
                layer.mlp_gamma.weight.grad,
                layer.mlp_beta.bias.grad,
                layer.mlp_shared[0].weight.grad,
            )
        )
    for name, a, b in zip(
        ("y", "grad x", "grad segmap", "grad mlp_gamma.weight", "grad mlp_beta.bias", "grad mlp_shared.0.weight"), *outs
    ):
        assert_close(a, b, torch.float64, name)
    for key, value in plain.state_dict().items():  # running statistics, and their count
        assert_close(ours.state_dict()[key].double(), value.double(), torch.float64, key)


def test_activation_is_fused():
    layer = fnevr.nn.SPADE(4, 3, 8, activation="relu")
    x, segmap = torch.randn(2, 4, 6, 6), torch.randn(2, 3, 3, 3)
    plain = fnevr.nn.SPADE(4, 3, 8)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x, segmap), torch.relu(plain(x, segmap)))


def test_bad_options():
    with pytest.raises(ValueError, match="norm must be one of"):
        fnevr.nn.SPADE(4, 3, norm="group")
    with pytest.raises(ValueError, match="activation must be one of"):
        fnevr.nn.SPADE(4, 3, activation="tanh")


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsampled_conv3x3_is_the_conv_of_the_nearest_upsampled_map(scale, hw, channels_last):
    from fnevr.nn.upsampled_conv import upsampled_conv3x3

    g = torch.Generator().manual_seed(scale)
    x = torch.randn(2, 6, *hw, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(F.interpolate(x, scale_factor=scale, mode="nearest"), weight, bias, padding=1)
    got = upsampled_conv3x3(x, weight, bias, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if scale > 1:
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with pytest.raises(ValueError, match="weight must be"):
        upsampled_conv3x3(x, weight[:, :, :2], bias, scale)


def test_spade_without_gradients_takes_the_low_resolution_conv_and_agrees():
    torch.manual_seed(0)
    layer = fnevr.nn.SPADE(8, 16, hidden_channels=12, activation="relu").double()
    x, segmap = torch.randn(2, 8, 32, 32, dtype=torch.float64), torch.randn(2, 16, 8, 8, dtype=torch.float64)
    with_grad = layer(x, segmap)
    calls = []
    layer.mlp_shared.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        without = layer(x, segmap)
    assert calls == []  # the module's own conv at full resolution did not run
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=1e-12)
    from fnevr.nn import recompute

    with recompute.saving_memory(checkpoint=True), torch.no_grad():  # as a checkpointed block's first pass
        torch.testing.assert_close(layer(x, segmap), with_grad.detach(), rtol=0, atol=0)
    assert calls == [1]  # computed as the recomputation in backward will: bit for bit
    segmap[0, 3, 2, 5] = float("inf")  # summed taps would give inf where the full-resolution conv gives NaN
    want = layer(x, segmap).detach()
    with torch.no_grad():
        got = layer(x, segmap)
    assert calls == [1, 1, 1] and torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
