"""The FNeVR model: keypoint detector, generator (dense motion, volume renderer, SPADE decoder),
multi-scale discriminator and pose editor, built from a config (``fnevr.config``).

>>> import torch, fnevr
>>> model = fnevr.FNeVR("small").eval()
>>> source, driving = torch.rand(2, 1, 3, 64, 64).unbind(0)
>>> out = model(source, driving)
>>> out["prediction"].shape
torch.Size([1, 3, 64, 64])
"""

import torch
from torch import Tensor, nn

from .. import ops
from ..config import load_config
from .decoder import SPADEBlock, SPADEDecoder
from .dense_motion import DenseMotion
from .discriminator import MultiScaleDiscriminator, PatchDiscriminator
from .generator import Generator
from .keypoints import KeypointDetector
from .pose_editor import PoseEditor
from .render import RaySampler, SampleMLP, VolumeRenderer


def build_keypoint_detector(config: dict) -> KeypointDetector:
    m = config["model_params"]
    common, p = m["common_params"], m["kp_detector_params"]
    return KeypointDetector(
        num_kp=common["num_kp"],
        num_channels=common["num_channels"],
        block_expansion=p["block_expansion"],
        max_features=p["max_features"],
        num_blocks=p["num_blocks"],
        temperature=p["temperature"],
        scale_factor=p.get("scale_factor", 1),
        estimate_jacobian=common.get("estimate_jacobian", False),
    )


def build_generator(config: dict) -> Generator:
    m = config["model_params"]
    common, p = m["common_params"], m["generator_params"]
    dm, r = p["dense_motion_params"], p["render_params"]
    return Generator(
        num_kp=common["num_kp"],
        num_channels=common["num_channels"],
        block_expansion=p["block_expansion"],
        max_features=p["max_features"],
        num_down_blocks=p["num_down_blocks"],
        estimate_occlusion_map=p.get("estimate_occlusion_map", True),
        dense_motion={
            "block_expansion": dm["block_expansion"],
            "max_features": dm["max_features"],
            "num_blocks": dm["num_blocks"],
            "scale_factor": dm.get("scale_factor", 1),
        },
        render={
            "color_channels": r["simpled_channel_rgb"],
            "shape_channels": r["simpled_channel_sigma"],
            "samples": r["floor_num"],
            "hidden": r["hidden_size"],
            "transmittance": r.get("transmittance", "inclusive"),
            "fused_head": r.get("fused_head", "none"),
        },
        modulation_channels=p.get("modulation_channels", 128),
    )


class FNeVR(nn.Module):
    """All FNeVR networks of one config. ``forward(source, driving)`` reconstructs ``driving``
    from ``source`` (both ``[B, 3, H, W]`` in [0, 1]) and returns the generator's outputs plus
    ``kp_source`` and ``kp_driving``; :meth:`animate` takes keypoints instead.

    ``discriminator`` and ``pose_editor`` are built with ``training_modules=True`` (the default)
    and are not in published checkpoints. :meth:`set_backend` chooses the backend of every fused op.
    """

    def __init__(self, config: str | dict = "vox-256", training_modules: bool = True):
        super().__init__()
        self.config = load_config(config)
        m = self.config["model_params"]
        self.kp_detector = build_keypoint_detector(self.config)
        self.generator = build_generator(self.config)
        self.discriminator = self.pose_editor = None
        if training_modules:
            d = m["discriminator_params"]
            self.discriminator = MultiScaleDiscriminator(
                scales=d.get("scales", [1]),
                num_channels=m["common_params"]["num_channels"],
                block_expansion=d["block_expansion"],
                num_blocks=d["num_blocks"],
                max_features=d["max_features"],
                sn=d.get("sn", False),
            )
            self.pose_editor = PoseEditor(m["common_params"]["num_kp"], **m.get("pose_editor_params", {}))
        self.set_backend(m.get("ops_backend", "auto"))

    def set_backend(self, backend: str) -> "FNeVR":
        """Run every fused op (grid sample, compositing, SPADE) on ``backend``."""
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}, got {backend!r}")
        for module in self.modules():
            if hasattr(module, "ops_backend"):
                setattr(module, "ops_backend", backend)  # noqa: B010  (mypy: nn.Module types attributes as tensors)
        self.backend = backend
        return self

    def channels_last(self) -> "FNeVR":
        """Store the 2-D convolution weights channels_last, so that the 2-D activations follow: oneDNN's
        convolutions then skip a layout conversion per call, and the fused ops keep the layout. On a
        2-core CPU at vox-256, batch 1: inference 1.6 s instead of 1.7 s, forward+backward 5.0 s
        instead of 5.3 s (benchmarks/results/model-vox256-cpu-2026-11-28.txt). (The 3-D
        convolutions keep theirs: ``Module.to(memory_format=)`` would fail on them.)"""
        for t in (*self.parameters(), *self.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
        return self

    def animate(
        self, source: Tensor, kp_source: dict, kp_driving: dict, source_features: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The generator's outputs; ``source_features``: ``generator.encode(source)``, if kept."""
        return self.generator(source, kp_driving=kp_driving, kp_source=kp_source, source_features=source_features)

    def forward(self, source: Tensor, driving: Tensor) -> dict[str, Tensor]:
        kp_source, kp_driving = self.kp_detector(source), self.kp_detector(driving)
        out = self.animate(source, kp_source, kp_driving)
        out["kp_source"], out["kp_driving"] = kp_source, kp_driving
        return out


__all__ = [
    "DenseMotion",
    "FNeVR",
    "Generator",
    "KeypointDetector",
    "MultiScaleDiscriminator",
    "PatchDiscriminator",
    "PoseEditor",
    "RaySampler",
    "SPADEBlock",
    "SPADEDecoder",
    "SampleMLP",
    "VolumeRenderer",
    "build_generator",
    "build_keypoint_detector",
]
