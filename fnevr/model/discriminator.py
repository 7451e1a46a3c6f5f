"""The multi-scale patch discriminator FOMM-style training uses (not part of the published model)."""

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..nn import recompute


def _norm_leaky_pool(norm: nn.Module, x: Tensor, pool: bool) -> Tensor:
    """leaky_relu(norm(x), 0.2), then a 2x average pool if ``pool``. ``norm`` is an Identity or a
    stateless InstanceNorm2d, so inside :func:`fnevr.nn.recompute.saving_memory` only ``x`` is kept."""

    def pure(x, *affine):
        if not isinstance(norm, nn.Identity):
            x = F.instance_norm(x, None, None, *affine, True, 0.0, norm.eps)
        y = F.leaky_relu(x, 0.2)
        return F.avg_pool2d(y, 2) if pool else y

    affine = () if isinstance(norm, nn.Identity) else (norm.weight, norm.bias)
    return recompute.recomputed(pure, x, *affine)


class PatchDiscriminator(nn.Module):
    """Image ``[B, 3, H, W]`` -> (feature maps of every block, patch scores ``[B, 1, h, w]``).

    ``num_blocks`` blocks of 4x4 conv (spectral norm with ``sn``) -> InstanceNorm (all but the
    first) -> LeakyReLU(0.2) -> 2x average pool (all but the last); a 1x1 conv gives the scores.
    """

    def __init__(
        self,
        num_channels: int = 3,
        block_expansion: int = 64,
        num_blocks: int = 4,
        max_features: int = 512,
        sn: bool = False,
    ):
        super().__init__()
        wrap = spectral_norm if sn else (lambda m: m)
        widths = [num_channels] + [min(max_features, block_expansion * 2 ** (i + 1)) for i in range(num_blocks)]
        self.convs = nn.ModuleList(wrap(nn.Conv2d(widths[i], widths[i + 1], 4)) for i in range(num_blocks))
        self.norms = nn.ModuleList(
            nn.InstanceNorm2d(widths[i + 1], affine=True) if i else nn.Identity() for i in range(num_blocks)
        )
        self.score = wrap(nn.Conv2d(widths[-1], 1, 1))

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        features = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = _norm_leaky_pool(norm, conv(x), i < len(self.convs) - 1)
            features.append(x)
        return features, self.score(x)


class MultiScaleDiscriminator(nn.Module):
    """One :class:`PatchDiscriminator` per pyramid scale, in FOMM's dict convention:
    ``{"prediction_<s>": image}`` (``fnevr.losses.ImagePyramid``'s output) ->
    ``{"feature_maps_<s>": [...], "prediction_map_<s>": [B, 1, h, w]}`` for the configured scales."""

    def __init__(self, scales=(1,), **kwargs):
        super().__init__()
        self.scales = [float(s) if float(s) != 1 else 1 for s in scales]
        self.discs = nn.ModuleDict({str(s).replace(".", "-"): PatchDiscriminator(**kwargs) for s in self.scales})

    def forward(self, pyramid: dict) -> dict:
        out = {}
        for s in self.scales:
            disc = self.discs[str(s).replace(".", "-")]
            out[f"feature_maps_{s}"], out[f"prediction_map_{s}"] = disc(pyramid[f"prediction_{s}"])
        return out
