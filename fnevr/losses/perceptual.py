r"""Perceptual losses: FOMM's multi-scale VGG19 loss and the L1 loss on FNeVR's mini render.

:class:`PerceptualPyramidLoss` compares prediction and target at every pyramid scale ``s`` through
the five VGG19 activations FOMM uses, ``relu1_1, relu2_1, relu3_1, relu4_1, relu5_1`` (torchvision
``vgg19().features[:2], [2:7], [7:12], [12:21], [21:30]``), on ImageNet-normalised input:

.. math::

    L = \sum_s \sum_{i=1}^{5} w_i \, \mathrm{mean}\,\lvert \phi_i(\hat x_s) - \phi_i(x_s) \rvert

Pyramid levels smaller than 16 pixels (e.g. scale 1/8 of a 64² demo image) reach only the first
layers (relu<k>_1 needs :math:`2^{k-1}` pixels per side); the sum then runs over those.

The VGG19 weights are never downloaded: they come from ``vgg_weights`` (a path to torchvision's
``vgg19-dcbb9e9d.pth`` or any state dict with its ``features.N.*`` keys) or, if not given, from the
torch hub cache (``torch.hub.get_dir()/checkpoints/vgg19-*.pth``, where ``torchvision`` puts it).
Without them a warning is logged that says what was searched and how to provide the weights, and
the ``fallback`` is used: ``"l1"`` (default) is pixel L1 on each pyramid level weighted by
:math:`\sum_i w_i`; ``"error"`` raises instead. Example::

    >>> import torch
    >>> from fnevr.losses import PerceptualPyramidLoss
    >>> loss_fn = PerceptualPyramidLoss([1, 0.5, 0.25, 0.125], [10, 10, 10, 10, 10])  # weights from the hub cache
    >>> pred, target = torch.rand(2, 3, 64, 64, requires_grad=True), torch.rand(2, 3, 64, 64)
    >>> loss = loss_fn(pred, target)   # scalar
    >>> loss.backward()
"""

import glob
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import lean, recompute
from ._precision import loss_dtype, to_loss_dtype
from .pyramid import ImagePyramid

logger = logging.getLogger(__name__)

VGG19_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))  # ends after relu1_1 ... relu5_1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FALLBACKS = ("l1", "error")


def load_state_dict(path, what: str, expected: str) -> dict:
    """``torch.load`` of a weights file (tensors only), as a ``{name: tensor}`` dict; ``ValueError``
    naming ``path`` for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} could not be read as {expected} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{what} {path} holds a {type(state).__name__} that is not {expected} (names -> tensors)")
    return state


def hub_vgg19_pattern() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", "vgg19-*.pth")


def find_vgg19_weights(path=None):
    """The VGG19 weights file to use: ``path`` if given (it must exist), else the first match of
    :func:`hub_vgg19_pattern` in the torch hub cache, else ``None``."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"vgg_weights: no file at {path!r} (expected torchvision's vgg19 state dict, e.g. vgg19-dcbb9e9d.pth)"
            )
        return Path(path)
    found = sorted(glob.glob(hub_vgg19_pattern()))
    return Path(found[0]) if found else None


class VGG19Features(nn.Module):
    """Frozen VGG19 trunk: ``forward(x [B, 3, H, W] in [0, 1]) -> [relu1_1, ..., relu5_1]`` with
    shapes ``[B, 64, H, W]``, ``[B, 128, H/2, W/2]``, ``[B, 256, H/4, W/4]``, ``[B, 512, H/8, W/8]``,
    ``[B, 512, H/16, W/16]``.

    Args:
        weights: path to a state dict with torchvision's ``vgg19`` keys (``features.N.weight`` /
            ``.bias``; a bare ``N.weight`` layout is accepted too). Loaded on CPU, never downloaded.
    """

    def __init__(self, weights):
        super().__init__()
        from torchvision.models import vgg19

        with torch.device("meta"):  # skip the random init of ~140M parameters that the weights replace
            trunk = vgg19(weights=None).features[: VGG19_SLICES[-1][1]]
        trunk = trunk.to_empty(device="cpu")
        state = load_state_dict(weights, "VGG19 weights", "torchvision's vgg19 state dict")
        state = {k[len("features.") :] if k.startswith("features.") else k: v for k, v in state.items()}
        wanted = trunk.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(
                f"VGG19 weights {weights}: missing keys {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                f"expected torchvision's vgg19 state dict"
            )
        trunk.load_state_dict({k: state[k] for k in wanted})
        self.slices = nn.ModuleList(trunk[a:b] for a, b in VGG19_SLICES)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never leave eval mode

    def forward(self, x: Tensor, layers: int = 5) -> list:
        """The first ``layers`` activations (relu1_1 ... ), ``1 <= layers <= 5``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19Features: expected [B, 3, H, W]; got {tuple(x.shape)}")
        out, h = [], (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        for block in self.slices[:layers]:
            for layer in block:
                h = _lean_layer(layer, h)
            out.append(h)
        return out


def _lean_layer(layer: nn.Module, h: Tensor) -> Tensor:
    """``layer(h)``; inside ``saving_memory`` (:mod:`fnevr.nn.lean`) the frozen convolutions keep
    no input, the ReLUs a bool mask, and the max pools one byte per output, not int64 indices."""
    if isinstance(layer, nn.Conv2d):
        return lean.frozen_conv2d(h, layer)
    if isinstance(layer, nn.ReLU):
        return lean.relu(h) if recompute.active() else layer(h)
    if (
        isinstance(layer, nn.MaxPool2d)
        and layer.kernel_size == layer.stride == 2
        and not layer.ceil_mode
        and layer.padding == 0
        and layer.dilation == 1
    ):
        return lean.max_pool2x2(h)
    return layer(h)


def reachable_layers(height: int, width: int) -> int:
    """How many of relu1_1 ... relu5_1 an ``height x width`` input reaches: relu<k>_1 comes after
    k - 1 2x2 max-pools, so it needs at least 2^(k-1) pixels per side."""
    return min(len(VGG19_SLICES), 1 + int(math.log2(max(1, min(height, width)))))


class PerceptualPyramidLoss(nn.Module):
    """Multi-scale perceptual loss (module doc). ``forward(prediction, target)``, both
    ``[B, 3, H, W]`` in ``[0, 1]``, returns a scalar; no gradient flows into ``target``.

    Args:
        scales: pyramid scales, e.g. ``[1, 0.5, 0.25, 0.125]``.
        weights: five per-layer weights ``w_i`` (FOMM: ``[10, 10, 10, 10, 10]``).
        vgg_weights: path to the VGG19 weights, or ``None`` to look in the torch hub cache.
        fallback: ``"l1"`` or ``"error"``, used when no weights are found.

    Attributes:
        mode: ``"vgg"`` or ``"l1"`` (the fallback in use).
    """

    def __init__(
        self, scales=(1, 0.5, 0.25, 0.125), weights=(10, 10, 10, 10, 10), vgg_weights=None, fallback: str = "l1"
    ):
        super().__init__()
        self.weights = [float(w) for w in weights]
        if len(self.weights) != len(VGG19_SLICES):
            raise ValueError(
                f"PerceptualPyramidLoss: weights must have {len(VGG19_SLICES)} entries "
                f"(relu1_1 ... relu5_1); got {list(weights)}"
            )
        if fallback not in FALLBACKS:
            raise ValueError(f"PerceptualPyramidLoss: fallback must be one of {FALLBACKS}; got {fallback!r}")
        self.pyramid = ImagePyramid(scales)
        path = find_vgg19_weights(vgg_weights)
        if path is None:
            message = (
                f"VGG19 weights not found: no vgg_weights path given and nothing matches "
                f"{hub_vgg19_pattern()}. To use the VGG19 perceptual loss, put torchvision's "
                f"vgg19-dcbb9e9d.pth there or pass its path as vgg_weights."
            )
            if fallback == "error":
                raise FileNotFoundError(message)
            logger.warning(
                "%s Using the fallback %r instead: pixel L1 on each pyramid level, weighted by "
                "the sum of the layer weights (%g).",
                message,
                fallback,
                sum(self.weights),
            )
            self.vgg, self.mode = None, fallback
        else:
            self.vgg, self.mode = VGG19Features(path), "vgg"

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        if prediction.shape != target.shape:
            raise ValueError(
                f"PerceptualPyramidLoss: prediction {tuple(prediction.shape)} and target "
                f"{tuple(target.shape)} differ in shape"
            )
        predicted, real = self.pyramid(prediction), self.pyramid(target.detach())
        total = prediction.new_zeros((), dtype=loss_dtype(prediction))
        for key, level in predicted.items():
            if self.vgg is None:
                total = total + sum(self.weights) * to_loss_dtype((level - real[key]).abs()).mean()
                continue
            layers = reachable_layers(*level.shape[2:])
            with torch.no_grad():
                real_features = self.vgg(real[key], layers)
            for weight, a, b in zip(self.weights, self.vgg(level, layers), real_features):
                if weight != 0:
                    total = total + weight * lean.l1_mean(a, b, loss_dtype(a))
        return total


def perceptual_l1(render: Tensor, target: Tensor) -> Tensor:
    r"""L1 between FNeVR's low-resolution render ``[B, C, h, w]`` and the full-size ``target``
    ``[B, C, H, W]`` downsampled (antialiased bilinear) to ``h x w``:
    :math:`\mathrm{mean}\,\lvert r - \mathrm{down}(x) \rvert`. No gradient flows into ``target``.

        >>> perceptual_l1(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 256, 256)).shape
        torch.Size([])
    """
    if render.dim() != 4 or target.dim() != 4 or render.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"perceptual_l1: render and target must be [B, C, h, w] and [B, C, H, W] with the same "
            f"B and C; got {tuple(render.shape)} and {tuple(target.shape)}"
        )
    target = target.detach()
    if target.shape[2:] != render.shape[2:]:
        target = F.interpolate(target, size=render.shape[2:], mode="bilinear", antialias=True, align_corners=False)
    return to_loss_dtype((render - target.to(render.dtype)).abs()).mean()
