"""Training augmentation after FOMM: horizontal flip, time flip and colour jitter, drawn once per
clip and applied identically to all its frames (so source and driving stay consistent).

Clips are float tensors ``[T, 3, H, W]`` in ``[0, 1]``. The jitter uses torchvision.transforms.v2
functionals (brightness, contrast, saturation factors uniform in ``[max(0, 1 - a), 1 + a]``, hue
shift uniform in ``[-h, h]``), applied in a random order as FOMM does. Unlike FOMM, which skips
the horizontal flip whenever it time-flips, the two flips are drawn independently. Example::

    >>> import torch
    >>> from fnevr.data.augment import Augmentation
    >>> aug = Augmentation(horizontal_flip=True, time_flip=True, jitter=dict(brightness=0.1, hue=0.1))
    >>> clip = torch.rand(2, 3, 64, 64)
    >>> out, info = aug(clip, torch.Generator().manual_seed(0))
    >>> out.shape, sorted(info)
    (torch.Size([2, 3, 64, 64]), ['horizontal_flip', 'time_flip'])
"""

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


class Augmentation:
    """Random flips and colour jitter for a clip ``[T, 3, H, W]``.

    Args:
        horizontal_flip: mirror the clip left-right with probability 1/2.
        time_flip: reverse the frame order with probability 1/2.
        jitter: ``{"brightness": a, "contrast": a, "saturation": a, "hue": h}`` (missing or 0: off;
            ``hue`` at most 0.5), or ``None`` for no jitter.
    """

    def __init__(self, horizontal_flip: bool = False, time_flip: bool = False, jitter=None):
        jitter = dict(jitter or {})
        unknown = set(jitter) - set(JITTER_KEYS)
        if unknown:
            raise ValueError(f"Augmentation: unknown jitter keys {sorted(unknown)}; expected {JITTER_KEYS}")
        for key, value in jitter.items():
            if not (0 <= float(value) <= (0.5 if key == "hue" else float("inf"))):
                raise ValueError(f"Augmentation: jitter {key} must be >= 0 (hue <= 0.5); got {value}")
        self.horizontal_flip = bool(horizontal_flip)
        self.time_flip = bool(time_flip)
        self.jitter = {k: float(v) for k, v in jitter.items() if float(v) > 0}

    @classmethod
    def from_config(cls, params):
        """From FOMM's ``augmentation_params``: ``{"flip_param": {"horizontal_flip", "time_flip"},
        "jitter_param": {...}}``; an :class:`Augmentation` is returned as is, ``None`` as ``None``."""
        if params is None or isinstance(params, cls):
            return params
        unknown = set(params) - {"flip_param", "jitter_param"}
        if unknown:
            raise ValueError(f"augmentation: unsupported keys {sorted(unknown)}; expected flip_param, jitter_param")
        flips = params.get("flip_param") or {}
        return cls(flips.get("horizontal_flip", False), flips.get("time_flip", False), params.get("jitter_param"))

    def __call__(self, clip: Tensor, generator: torch.Generator = None):
        """Returns ``(augmented clip, {"horizontal_flip": bool, "time_flip": bool})``."""
        if clip.dim() != 4 or clip.shape[1] != 3:
            raise ValueError(f"Augmentation: clip must be [T, 3, H, W]; got {tuple(clip.shape)}")

        def uniform(low, high):
            return low + (high - low) * torch.rand((), generator=generator).item()

        info = {
            "time_flip": self.time_flip and uniform(0, 1) < 0.5,
            "horizontal_flip": self.horizontal_flip and uniform(0, 1) < 0.5,
        }
        if info["time_flip"]:
            clip = clip.flip(0)
        if info["horizontal_flip"]:
            clip = clip.flip(-1)
        if self.jitter:
            ops = []
            for key, amount in self.jitter.items():
                if key == "hue":
                    ops.append((TF.adjust_hue, uniform(-amount, amount)))
                else:
                    ops.append((getattr(TF, f"adjust_{key}"), uniform(max(0.0, 1 - amount), 1 + amount)))
            for i in torch.randperm(len(ops), generator=generator).tolist():
                op, factor = ops[i]
                clip = op(clip, factor)
            clip = clip.clamp(0, 1)
        return clip, info
