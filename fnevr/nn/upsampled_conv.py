r"""A 3x3 convolution of a nearest-upsampled map, computed at the map's own resolution.

SPADE convolves its modulation map after resizing it (nearest) to each decoder level: 64² to 256²
in vox-256, where that convolution is most of the decoder's work. Upsampled by an integer ``s``,
the map is constant on ``s x s`` cells, so each output pixel's 3x3 window reads at most 2x2 source
pixels. Along one axis, output ``s i + a`` sees source rows

.. math::

    a = 0: \{i-1: w_0,\ i: w_1 + w_2\}, \qquad 0 < a < s-1: \{i: w_0 + w_1 + w_2\}, \qquad
    a = s-1: \{i: w_0 + w_1,\ i+1: w_2\}

(rows outside the map are the convolution's zero padding, at either resolution). Each of the 3x3
phase classes (2x2 for ``s = 2``) is one small convolution at the source resolution with the
summed taps; its output fills every phase of its class. At ``s = 4`` that is 25 tap-units instead
of 144, the same sums in another order (round-off apart).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def upsampled_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, scale: int) -> Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=scale, mode="nearest"), weight, bias, padding=1)``.

    Args:
        x: ``[N, C_in, h, w]``.
        weight: ``[C_out, C_in, 3, 3]``; bias: ``[C_out]`` or ``None``.
        scale: the integer upsampling factor, ``>= 1``.

    Returns ``[N, C_out, scale h, scale w]``, channels_last when ``weight`` is (as
    :meth:`fnevr.FNeVR.channels_last` stores the decoder's), else contiguous.
    """
    if weight.shape[2:] != (3, 3):
        raise ValueError(f"upsampled_conv3x3: weight must be [C_out, C_in, 3, 3]; got {tuple(weight.shape)}")
    if scale < 2:
        return F.conv2d(x, weight, bias, padding=1) if scale == 1 else _bad_scale(scale)
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    # per axis: (phases, {source offset: the kernel taps summed for it})
    classes = [
        ([0], {-1: [0], 0: [1, 2]}),
        (list(range(1, scale - 1)), {0: [0, 1, 2]}),
        ([scale - 1], {0: [0, 1], 1: [2]}),
    ]
    last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    out = None
    for rows, row_taps in classes:
        if not rows:
            continue
        for cols, col_taps in classes:
            if not cols:
                continue
            kernel = torch.stack(
                [
                    torch.stack([weight[:, :, r][:, :, :, c].sum(dim=(2, 3)) for c in col_taps.values()], dim=-1)
                    for r in row_taps.values()
                ],
                dim=-2,
            )  # [C_out, C_in, rows taps, cols taps]
            r0, r1 = min(row_taps), max(row_taps)
            c0, c1 = min(col_taps), max(col_taps)
            part = F.conv2d(padded[:, :, 1 + r0 : 1 + r1 + h, 1 + c0 : 1 + c1 + w], kernel, bias)
            if out is None:
                shape = (n, h, scale, w, scale, part.shape[1]) if last else (n, part.shape[1], h, scale, w, scale)
                out = part.new_empty(shape)
            for a in rows:
                for b in cols:
                    if last:
                        out[:, :, a, :, b, :] = part.permute(0, 2, 3, 1)
                    else:
                        out[:, :, :, a, :, b] = part
    assert out is not None
    if last:
        return out.view(n, h * scale, w * scale, -1).permute(0, 3, 1, 2)
    return out.view(n, -1, h * scale, w * scale)


def _bad_scale(scale):
    raise ValueError(f"upsampled_conv3x3: scale must be an integer >= 1; got {scale}")
