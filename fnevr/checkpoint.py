"""Checkpoints: the published FNeVR format and ours.

Published (``torch.save`` of ``{"generator": state_dict, "kp_detector": state_dict, ...}``, key
names of the authors' modules) and ours (``{"format": "fnevr", "version": 1, "fnevr_version":
"0.1.0", "config": ..., "model": FNeVR state_dict, "training": optimizer/scheduler/scaler/RNG
states, step...}``). :func:`load_checkpoint` reads both; published keys are renamed to ours by the
table below.

``version`` is the format's: it goes up when a change to the model or to this layout would make
an older fnevr misread a checkpoint, and an older fnevr refuses a newer version with a message
naming both (``fnevr_version``: the release that wrote it).
Checkpoints are written atomically (temporary file in the same folder, then ``os.replace``).
"""

import os
import re
from pathlib import Path

import torch

from ._files import atomic_path
from ._version import __version__
from .model import FNeVR

FORMAT, VERSION = "fnevr", 1

# (published key pattern, our key): applied in order, first match wins, per network.
_GENERATOR_RULES = [
    (r"^dense_motion_network\.hourglass\.encoder\.down_blocks\.", "dense_motion.hourglass.down."),
    (r"^dense_motion_network\.hourglass\.decoder\.up_blocks\.", "dense_motion.hourglass.up."),
    (r"^dense_motion_network\.mask\.", "dense_motion.mask_head."),
    (r"^dense_motion_network\.occlusion\.", "dense_motion.occlusion_head."),
    (r"^dense_motion_network\.down\.", "dense_motion.downsample."),
    (r"^first\.", "stem."),
    (r"^down_blocks\.", "down."),
    (r"^Render_model\.rgb_predict\.down_conv\.", "renderer.ray_sampler.color_conv."),
    (r"^Render_model\.sigma_predict\.down_conv\.", "renderer.ray_sampler.shape_conv."),
    (r"^Render_model\.sigma_predict\.res_conv3d\.", "renderer.ray_sampler.shape_blocks."),
    (r"^Render_model\.nerf_module\.layer1\.", "renderer.sample_mlp.shape_in."),
    (r"^Render_model\.nerf_module\.layer2\.", "renderer.sample_mlp.shape_hidden."),
    (r"^Render_model\.nerf_module\.layer3_1\.", "renderer.sample_mlp.density."),
    (r"^Render_model\.nerf_module\.layer3_2\.", "renderer.sample_mlp.shape_feature."),
    (r"^Render_model\.nerf_module\.layer3_3\.", "renderer.sample_mlp.color_in."),
    (r"^Render_model\.nerf_module\.layer4\.", "renderer.sample_mlp.fuse."),
    (r"^Render_model\.nerf_module\.layer5\.", "renderer.sample_mlp.fuse_hidden."),
    (r"^Render_model\.nerf_module\.layer6\.", "renderer.sample_mlp.color_out."),
    (r"^Render_model\.mini_decoder\.0\.", "renderer.mini_decoder.0."),
    (r"^Render_model\.mini_decoder\.2\.", "renderer.mini_decoder.1."),
    (r"^decoder\.seg_conv\.0\.", "decoder.modulation_conv."),
    (r"^decoder\.SPADE_(\d)\.SPADE_0\.", r"decoder.blocks.\1.norm1."),
    (r"^decoder\.SPADE_(\d)\.SPADE_1\.", r"decoder.blocks.\1.norm2."),
    (r"^decoder\.SPADE_(\d)\.conv_0\.", r"decoder.blocks.\1.conv1."),
    (r"^decoder\.SPADE_(\d)\.conv_1\.", r"decoder.blocks.\1.conv2."),
    (r"^decoder\.final\.0\.", "decoder.to_rgb."),
]
_KP_RULES = [
    (r"^predictor\.encoder\.down_blocks\.", "hourglass.down."),
    (r"^predictor\.decoder\.up_blocks\.", "hourglass.up."),
    (r"^kp\.", "heatmap_head."),
    (r"^jacobian\.", "jacobian_head."),
    (r"^down\.", "downsample."),
]


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return None


def published_to_fnevr(checkpoint: dict) -> dict:
    """A published checkpoint's ``generator`` and ``kp_detector`` state dicts as one state dict
    with our key names (``generator.*``, ``kp_detector.*``). Unknown keys keep their name under
    their network's prefix, so they are reported as unexpected."""
    state = {}
    for net, rules in (("generator", _GENERATOR_RULES), ("kp_detector", _KP_RULES)):
        for key, value in checkpoint[net].items():
            state[f"{net}.{_rename(key, rules) or key}"] = value
    return state


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the model: lists missing, unexpected and misshaped keys."""


def _match(model: torch.nn.Module, state: dict, path, prefixes) -> None:
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or misshaped:

        def block(title, items):
            shown = "\n".join(f"    {i}" for i in items[:20])
            if len(items) > 20:
                shown += f"\n    ... {len(items) - 20} more"
            return f"  {title} ({len(items)}):\n{shown}" if items else ""

        parts = [block("missing", missing), block("unexpected", unexpected), block("misshaped", misshaped)]
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit the model of this config:\n" + "\n".join(p for p in parts if p)
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def load_checkpoint(
    path: str | os.PathLike,
    config: str | dict | None = None,
    *,
    map_location="cpu",
    training_modules: bool | None = None,
) -> tuple[FNeVR, dict]:
    """Load a published FNeVR checkpoint or one of ours into a new :class:`~fnevr.model.FNeVR`.

    Args:
        path: the ``.pth``/``.pth.tar`` file.
        config: bundled name, YAML path or dict; defaults to the config stored in our checkpoints,
            and for published ones to ``"vox-256"``, the only configuration the authors released.
        training_modules: build the discriminator and pose editor; default: when the checkpoint has them.

    Returns:
        ``(model, extra)``: the model in eval mode, and for our format the rest of the checkpoint
        (``training``, ``step``...), for the published format its other top-level entries.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder; expected a checkpoint file (.pt/.pth)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of state dicts")
    if ckpt.get("format") == FORMAT:
        _check_version(path, ckpt)
        _check_state(path, ckpt, "model")
        if config is None and not isinstance(ckpt.get("config"), dict):
            raise ValueError(f"checkpoint {path}: its 'config' entry is missing or not a dict; pass a config")
        config = config if config is not None else ckpt["config"]
        state = ckpt["model"]
        extra = {k: v for k, v in ckpt.items() if k not in ("model", "config")}
    elif "generator" in ckpt and "kp_detector" in ckpt:
        _check_state(path, ckpt, "generator")
        _check_state(path, ckpt, "kp_detector")
        config = "vox-256" if config is None else config
        state = published_to_fnevr(ckpt)
        extra = {k: v for k, v in ckpt.items() if k not in ("generator", "kp_detector")}
    else:
        raise ValueError(
            f"checkpoint {path} is neither fnevr's format nor the published one "
            f"(top-level keys: {sorted(map(str, ckpt))[:10]}; expected 'generator' and 'kp_detector')"
        )
    has_training = any(k.startswith(("discriminator.", "pose_editor.")) for k in state)
    training_modules = has_training if training_modules is None else training_modules
    model = FNeVR(config, training_modules=training_modules)
    prefixes = ("kp_detector.", "generator.") + (("discriminator.", "pose_editor.") if training_modules else ())
    _match(model, {k: v for k, v in state.items() if training_modules or k.startswith(prefixes)}, path, prefixes)
    return model.eval(), extra


class CheckpointVersionError(ValueError):
    """A checkpoint in a format version this fnevr does not know (written by a newer fnevr)."""


def _check_version(path, ckpt: dict):
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointVersionError(f"checkpoint {path}: its format version is {version!r}; expected an integer >= 1")
    if version > VERSION:
        writer = f" (written by fnevr {ckpt['fnevr_version']})" if "fnevr_version" in ckpt else ""
        raise CheckpointVersionError(
            f"checkpoint {path} is in fnevr checkpoint format version {version}{writer}; "
            f"this fnevr {__version__} reads versions up to {VERSION}: upgrade fnevr to load it"
        )


def _check_state(path, ckpt: dict, entry: str):
    state = ckpt[entry]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(
            f"checkpoint {path}: its {entry!r} entry is a {type(state).__name__}, not a state dict (names -> tensors)"
        )


def save_checkpoint(path: str | os.PathLike, model: FNeVR, **extra) -> Path:
    """Write ``model`` (with its config) and ``extra`` (training state, step...) atomically to ``path``."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "fnevr_version": __version__,
        "config": model.config,
        "model": model.state_dict(),
        **extra,
    }
    with atomic_path(path, fsync=True) as tmp:
        torch.save(payload, tmp)
    return path
