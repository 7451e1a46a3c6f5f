r"""Reconstruction metrics: L1, PSNR, SSIM and LPIPS (torchmetrics), for ``fnevr evaluate``.

For images in ``[0, 1]``, per image :math:`n` of ``N``:

.. math::

    \mathrm{L1} = \mathrm{mean}\,\lvert \hat x - x \rvert, \quad
    \mathrm{PSNR}_n = 10 \log_{10} \frac{1}{\mathrm{MSE}_n}, \quad
    \mathrm{SSIM}_n \ \text{(Gaussian window 11, } \sigma = 1.5), \quad
    \mathrm{LPIPS}_n \ \text{(AlexNet by default)}

and :func:`evaluate_pairs` reports their means over the images (PSNR of identical images is inf).

LPIPS never downloads: its linear layers ship with torchmetrics (``lpips_models/<net>.pth``) and
its backbone weights come from a path (torchvision's ``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth`` or ``squeezenet1_1-b8a52dc0.pth``) or the torch hub cache. Without them
:func:`load_lpips` logs what is missing and returns ``None``, and LPIPS is left out. Example::

    >>> import torch
    >>> from fnevr.metrics import evaluate_pairs, load_lpips
    >>> pred, target = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    >>> sorted(evaluate_pairs(pred, target, lpips=load_lpips()))   # 'lpips' only if weights are found
    ['l1', 'psnr', 'ssim']
"""

import glob
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

logger = logging.getLogger(__name__)

LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def find_lpips_backbone(net: str = "alex", path=None):
    """The backbone weights file for LPIPS: ``path`` (must exist), else the first
    ``torch.hub.get_dir()/checkpoints/<torchvision model>-*.pth``, else ``None``."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONES)}; got {net!r}")
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"lpips backbone weights: no file at {path!r}")
        return Path(path)
    found = sorted(glob.glob(_hub_pattern(net)))
    return Path(found[0]) if found else None


def load_lpips(backbone_weights=None, net: str = "alex", linear_weights=None):
    """An LPIPS module (torchmetrics' network, eval mode, frozen) with its backbone loaded from
    ``backbone_weights`` (or the hub cache) and its linear layers from ``linear_weights`` (default:
    the copy shipped with torchmetrics); ``None`` (with a logged message) when no backbone weights
    are found."""
    path = find_lpips_backbone(net, backbone_weights)
    if path is None:
        logger.warning(
            "LPIPS skipped: no %s backbone weights (no path given and nothing matches %s). Put "
            "torchvision's %s weights there or pass their path to compute LPIPS.",
            LPIPS_BACKBONES[net],
            _hub_pattern(net),
            LPIPS_BACKBONES[net],
        )
        return None
    import torchvision

    # torchmetrics' LPIPS network; pnet_rand=True builds the backbone without downloading weights.
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    from .losses.perceptual import load_state_dict

    model = _NoTrainLpips(pretrained=True, net=net, pnet_rand=True, model_path=linear_weights)
    with torch.device("meta"):
        features = getattr(torchvision.models, LPIPS_BACKBONES[net])(weights=None).features
    features = features.to_empty(device="cpu")
    state = load_state_dict(path, "LPIPS backbone weights", f"torchvision's {LPIPS_BACKBONES[net]} state dict")
    state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    missing = [k for k in features.state_dict() if k not in state]
    if missing:
        raise ValueError(
            f"LPIPS backbone weights {path}: missing keys features.{missing[0]}...; expected "
            f"torchvision's {LPIPS_BACKBONES[net]} state dict"
        )
    features.load_state_dict({k: state[k] for k in features.state_dict()})
    for block in model.net.slices if net == "squeeze" else _alex_vgg_slices(model.net):
        for index, layer in block.named_children():  # torchmetrics names each layer by its index in features
            layer.load_state_dict(features[int(index)].state_dict())
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def evaluate_pairs(pred: Tensor, target: Tensor, lpips: nn.Module = None, chunk: int = 64) -> dict:
    """Mean metrics of ``pred`` against ``target``, both ``[N, 3, H, W]`` in ``[0, 1]`` (``H, W >= 11``
    for SSIM).

    Returns:
        ``{"l1": float, "psnr": float, "ssim": float[, "lpips": float]}`` (``lpips`` when a module
        from :func:`load_lpips` is given); computed in fp32, ``chunk`` images at a time.
    """
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3 or pred.shape[0] == 0:
        raise ValueError(
            f"evaluate_pairs: pred and target must both be [N, 3, H, W] with N > 0; got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if min(pred.shape[2:]) < 11:
        raise ValueError(f"evaluate_pairs: images must be at least 11x11 (SSIM window); got {tuple(pred.shape[2:])}")
    sums = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0}
    if lpips is not None:
        sums["lpips"] = 0.0
        lpips = lpips.to(pred.device)
    for start in range(0, pred.shape[0], chunk):
        p = pred[start : start + chunk].float().clamp(0, 1)
        t = target[start : start + chunk].float().clamp(0, 1)
        sums["l1"] += (p - t).abs().mean(dim=(1, 2, 3)).sum().item()
        sums["psnr"] += peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)).sum().item()
        sums["ssim"] += structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(p, t, normalize=True).sum().item()
    return {k: v / pred.shape[0] for k, v in sums.items()}


def _hub_pattern(net: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", f"{LPIPS_BACKBONES[net]}-*.pth")


def _alex_vgg_slices(backbone):
    return [getattr(backbone, f"slice{i}") for i in range(1, 6)]
