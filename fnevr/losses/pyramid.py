r"""Image pyramid with anti-aliased (Gaussian) downsampling, for the multi-scale losses.

Level ``s`` of ``x`` ``[B, C, H, W]`` is ``x`` blurred by a Gaussian of standard deviation
:math:`\sigma = (1/s - 1) / 2` pixels (kernel of :math:`2\,\mathrm{round}(4\sigma) + 1` taps, zero
padding, as FOMM) and then sampled every :math:`1/s` pixels (nearest), giving
``[B, C, round(H s), round(W s)]``; scale 1 is ``x`` itself. Example::

    >>> import torch
    >>> from fnevr.losses import ImagePyramid
    >>> pyramid = ImagePyramid([1, 0.5, 0.25, 0.125])
    >>> levels = pyramid(torch.rand(2, 3, 256, 256))
    >>> {k: tuple(v.shape) for k, v in levels.items()}["prediction_0.125"]
    (2, 3, 32, 32)
"""

import torch.nn.functional as F
from torch import Tensor, nn

from ..model.blocks import gaussian_kernel


class ImagePyramid(nn.Module):
    """``forward(x [B, C, H, W]) -> {"prediction_<s>": [B, C, H*s, W*s] for s in scales}``
    (the keys FOMM's multi-scale discriminator reads).

    Args:
        scales: downsampling factors in ``(0, 1]``, e.g. ``[1, 0.5, 0.25, 0.125]``.
    """

    def __init__(self, scales=(1, 0.5, 0.25, 0.125)):
        super().__init__()
        self.scales = [float(s) if float(s) != 1 else 1 for s in scales]
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"ImagePyramid: scales must be non-empty and in (0, 1]; got {list(scales)}")
        for i, scale in enumerate(self.scales):
            self.register_buffer(f"kernel{i}", gaussian_kernel(scale), persistent=False)

    def forward(self, x: Tensor) -> dict:
        if x.dim() != 4:
            raise ValueError(f"ImagePyramid: expected [B, C, H, W]; got {tuple(x.shape)}")
        return {f"prediction_{s}": downsample(x, s, getattr(self, f"kernel{i}")) for i, s in enumerate(self.scales)}


def downsample(x: Tensor, scale: float, kernel: Tensor) -> Tensor:
    """Blur ``x`` ``[B, C, H, W]`` with the separable ``kernel`` ``[K]``, then keep every ``1/scale``-th
    pixel (nearest)."""
    if scale == 1:
        return x
    channels, pad = x.shape[1], kernel.numel() // 2
    k = kernel.to(x.dtype)
    out = F.pad(x, (pad, pad, pad, pad))
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.interpolate(out, scale_factor=(scale, scale), mode="nearest")
