"""Configurations: YAML files with the published FNeVR keys (``fnevr/configs/*.yaml``).

``load_config("vox-256")`` or ``load_config("small")`` reads a bundled one; any other string is a
path. The dict keeps the published layout (``dataset_params``, ``model_params``, ``train_params``...).
"""

import copy
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


def load_config(name_or_path: str | Path | dict) -> dict:
    """A config dict from a bundled name (``"vox-256"``, ``"small"``), a YAML path, or a dict (copied)."""
    if isinstance(name_or_path, dict):
        return copy.deepcopy(name_or_path)
    path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in BUILTIN else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a bundled config {BUILTIN} nor a YAML file")
    import yaml  # here, so that `import fnevr` needs nothing beyond torch

    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or "model_params" not in config:
        raise ValueError(f"config {path} has no 'model_params' section: is it an FNeVR config?")
    return config
