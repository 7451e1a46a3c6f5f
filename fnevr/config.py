"""Configurations: YAML files with the published FNeVR keys (``fnevr/configs/*.yaml``).

``load_config("vox-256")`` or ``load_config("small")`` reads a bundled one; any other string is a
path. The dict keeps the published layout (``dataset_params``, ``model_params``, ``train_params``...).

fnevr's own configs carry ``fnevr_config_version`` (:data:`VERSION`); it goes up when a key changes
meaning, and an older fnevr refuses a newer config rather than misread it. The authors' configs
have no such key: they are version 1.
"""

import copy
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
VERSION = 1


def load_config(name_or_path: str | Path | dict) -> dict:
    """A config dict from a bundled name (``"vox-256"``, ``"small"``), a YAML path, or a dict (copied)."""
    if isinstance(name_or_path, dict):
        return _check_version(copy.deepcopy(name_or_path), "the config dict")
    path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in BUILTIN else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a bundled config {BUILTIN} nor a YAML file")
    import yaml  # here, so that `import fnevr` needs nothing beyond torch

    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or "model_params" not in config:
        raise ValueError(f"config {path} has no 'model_params' section: is it an FNeVR config?")
    return _check_version(config, f"config {path}")


def _check_version(config: dict, what: str) -> dict:
    version = config.get("fnevr_config_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{what}: fnevr_config_version must be an integer >= 1, got {version!r}")
    if version > VERSION:
        from ._version import __version__

        raise ValueError(
            f"{what} is fnevr config version {version}; this fnevr {__version__} reads versions up to "
            f"{VERSION}: upgrade fnevr to use it"
        )
    return config
