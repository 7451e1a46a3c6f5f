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
import warnings
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


# --- motion and identity: AKD and AED (FOMM's protocol) -----------------------------------------------------------

FACE_ALIGNMENT_FILES = ("2DFAN4*", "s3fd*")  # face-alignment's landmark and detector weights in the hub cache


def load_landmarks(path=None, device="cpu"):
    """A 68-point face-landmark model for AKD: ``images [N, 3, H, W]`` in ``[0, 1]`` -> ``[N, 68, 2]``
    pixel coordinates (x, y), NaN where no face is found.

    ``path``: a saved module with that contract (``torch.export.save`` or ``torch.jit.save``). Without it, the
    ``face-alignment`` package (what FOMM's evaluation uses), if it is installed and its weights are
    already in the torch hub cache (``2DFAN4*`` and ``s3fd*`` under ``torch.hub.get_dir()/checkpoints``):
    it is never allowed to download them. Else ``None``, with a logged message saying what is missing."""
    if path is not None:
        return _load_saved(path, "landmark model", device)
    try:
        import face_alignment
    except ImportError:
        logger.warning(
            "AKD skipped: no landmark model (pass --landmark-model PATH, a saved module, or "
            "pip install face-alignment with its weights in %s)",
            os.path.join(torch.hub.get_dir(), "checkpoints"),
        )
        return None
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    missing = [p for p in FACE_ALIGNMENT_FILES if not glob.glob(os.path.join(folder, p))]
    if missing:
        logger.warning(
            "AKD skipped: face-alignment's weights are not in %s (missing %s); nothing is downloaded",
            folder,
            ", ".join(missing),
        )
        return None
    kind = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
    aligner = face_alignment.FaceAlignment(kind, flip_input=False, device=str(device))

    def landmarks(images: Tensor) -> Tensor:
        batch = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = torch.full((len(batch), 68, 2), float("nan"), dtype=torch.float64)
        for i, image in enumerate(batch):
            found = aligner.get_landmarks(image)
            if found:
                out[i] = torch.as_tensor(found[0][:, :2], dtype=torch.float64)
        return out

    return landmarks


def load_identity(path=None, device="cpu"):
    """An identity-embedding model for AED: ``images [N, 3, H, W]`` in ``[0, 1]`` -> ``[N, D]``, a
    TorchScript module at ``path`` (e.g. an OpenFace or FaceNet network saved with
    ``torch.jit.save``). ``None`` (with a logged message) without a path."""
    if path is None:
        logger.warning("AED skipped: no identity model (pass --identity-weights PATH, a saved module)")
        return None
    return _load_saved(path, "identity model", device)


def _load_saved(path, what: str, device):
    """A saved model: a ``torch.export`` program (``torch.export.save``, run where it was exported)
    or a TorchScript module (``torch.jit.save``, moved to ``device``). Returns a callable that takes
    and returns tensors on the caller's device."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        module = torch.export.load(str(path)).module()
    except Exception:
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, yet it is what most such models ship as
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise ValueError(
                f"{what} {path}: neither a torch.export program nor a TorchScript module ({type(e).__name__}: {e})"
            ) from None
    where = next((t.device for t in module.parameters()), next((t.device for t in module.buffers()), None))
    where = where or torch.device(device)

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return module(images.to(where)).to(images.device)

    return run


def quantize(images: Tensor) -> Tensor:
    """Images as the published evaluation sees them, saved as 8-bit png: rounded to ``k/255``."""
    return (images.clamp(0, 1) * 255).round() / 255


@torch.no_grad()
def keypoint_distance(pred: Tensor, target: Tensor) -> tuple[float, int]:
    """AKD's sum and count: for each frame where both ``[N, K, 2]`` keypoint sets are found (no
    NaN), the mean over keypoints of the Euclidean distance. Returns ``(sum over frames, frames)``."""
    distance = (pred.double() - target.double()).norm(dim=-1).mean(dim=-1)
    found = torch.isfinite(distance)
    return distance[found].sum().item(), int(found.sum())


@torch.no_grad()
def embedding_distance(pred: Tensor, target: Tensor) -> float:
    """AED's sum over frames: the Euclidean distance between the ``[N, D]`` identity embeddings."""
    return (pred.double().flatten(1) - target.double().flatten(1)).norm(dim=-1).sum().item()
