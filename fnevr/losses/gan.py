r"""LSGAN losses and feature matching over a multi-scale discriminator's outputs.

A multi-scale discriminator returns, for every scale ``s``, a dict entry ``prediction_map_<s>``
(``[B, 1, h, w]`` realness map) and ``feature_maps_<s>`` (list of intermediate features), as in
FOMM. With :math:`D_s` the map on real and :math:`\hat D_s` on generated images:

.. math::

    L_G = \sum_s \mathrm{mean}\,(1 - \hat D_s)^2, \qquad
    L_D = \sum_s \mathrm{mean}\,\big[(1 - D_s)^2 + \hat D_s^2\big], \qquad
    L_{FM} = \sum_s \sum_i w_i \, \mathrm{mean}\,\lvert F_{s,i} - \hat F_{s,i} \rvert

Example::

    >>> import torch
    >>> from fnevr.losses import lsgan_generator_loss, lsgan_discriminator_loss, feature_matching_loss
    >>> fake = {"prediction_map_1": torch.zeros(2, 1, 8, 8), "feature_maps_1": [torch.zeros(2, 4, 8, 8)]}
    >>> real = {"prediction_map_1": torch.ones(2, 1, 8, 8), "feature_maps_1": [torch.ones(2, 4, 8, 8)]}
    >>> lsgan_generator_loss(fake), lsgan_discriminator_loss(real, fake), feature_matching_loss(real, fake, [10])
    (tensor(1.), tensor(0.), tensor(10.))
"""

import torch
from torch import Tensor

from ..nn.lean import l1_mean
from ._precision import loss_dtype, to_loss_dtype

MAP, FEATURES = "prediction_map_", "feature_maps_"


def _scales(outputs: dict, prefix: str, scales):
    keys = [k for k in outputs if k.startswith(prefix)] if scales is None else [f"{prefix}{s}" for s in scales]
    missing = [k for k in keys if k not in outputs]
    if not keys or missing:
        raise KeyError(
            f"discriminator outputs: expected keys '{prefix}<scale>' "
            f"{'for scales ' + str(list(scales)) if scales is not None else ''}; "
            f"missing {missing or prefix + '*'} in {sorted(outputs)}"
        )
    return keys


def lsgan_generator_loss(fake: dict, scales=None) -> Tensor:
    """:math:`\\sum_s \\mathrm{mean}(1 - \\hat D_s)^2` over ``fake["prediction_map_<s>"]``
    (all such keys, or those of ``scales``)."""
    return sum(((1 - to_loss_dtype(fake[k])) ** 2).mean() for k in _scales(fake, MAP, scales))


def lsgan_discriminator_loss(real: dict, fake: dict, scales=None) -> Tensor:
    """:math:`\\sum_s \\mathrm{mean}[(1 - D_s)^2 + \\hat D_s^2]`; pass ``fake`` computed on detached
    generated images."""
    keys = _scales(real, MAP, scales)
    _scales(fake, MAP, [k[len(MAP) :] for k in keys])
    return sum(((1 - to_loss_dtype(real[k])) ** 2 + to_loss_dtype(fake[k]) ** 2).mean() for k in keys)


def feature_matching_loss(real: dict, fake: dict, weights, scales=None) -> Tensor:
    """:math:`\\sum_s \\sum_i w_i \\mathrm{mean}|F_{s,i} - \\hat F_{s,i}|` over
    ``feature_maps_<s>`` lists; layers with weight 0 are skipped and the real features are
    treated as constants (detached)."""
    keys = _scales(real, FEATURES, scales)
    _scales(fake, FEATURES, [k[len(FEATURES) :] for k in keys])
    total = torch.zeros((), dtype=loss_dtype(real[keys[0]][0]), device=real[keys[0]][0].device)
    for key in keys:
        if len(real[key]) != len(fake[key]) or len(weights) < len(real[key]):
            raise ValueError(
                f"feature_matching_loss: {key} has {len(real[key])} real and {len(fake[key])} fake "
                f"feature maps and {len(weights)} weights; expected equal counts and a weight each"
            )
        for weight, a, b in zip(weights, real[key], fake[key]):
            if weight != 0:
                # |b - a| = |a - b| bit for bit; lean.l1_mean keeps only the sign for backward
                total = total + float(weight) * l1_mean(to_loss_dtype(b), to_loss_dtype(a), loss_dtype(b))
    return total
