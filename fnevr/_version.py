"""fnevr's version: one place, read by the package metadata (pyproject.toml) and by exported artefacts."""

__version__ = "0.1.0"
