"""The FNeVR training objective (paper appendix B.2, after FOMM) as two modules, one per optimiser
side, so each can be wrapped in DistributedDataParallel.

:class:`GeneratorLoss` runs keypoint detector + generator (+ pose editor) on a batch and returns the
weighted losses: multi-scale perceptual (VGG19, or its fallback), LSGAN generator and feature
matching, keypoint equivariance (values and Jacobians) under a random TPS, ``perceptual_l1`` of the
mini render, and the pose-edit loss when the batch has pose angles. :class:`DiscriminatorLoss`
returns the LSGAN discriminator loss on the detached prediction.
"""

import torch
from torch import Tensor, nn

from .. import losses as L
from ..losses._precision import to_loss_dtype
from ..model import FNeVR


class GeneratorLoss(nn.Module):
    """``forward(batch, tps) -> (losses {name: weighted scalar}, generated outputs)``.

    ``batch``: ``{"source", "driving": [B, 3, H, W]}`` and optionally ``"pose"`` ``[B, 3]`` (yaw,
    pitch, roll change from source to driving). ``tps``: a :class:`fnevr.losses.RandomTPS` for the
    batch, or ``None`` when both equivariance weights are 0.
    """

    def __init__(self, model: FNeVR, train_params: dict, perceptual: L.PerceptualPyramidLoss):
        super().__init__()
        self.kp_detector, self.generator = model.kp_detector, model.generator
        self.discriminator, self.pose_editor = model.discriminator, model.pose_editor
        self.weights = train_params["loss_weights"]
        self.perceptual = perceptual
        self.disc_scales = model.discriminator.scales
        self.pyramid = L.ImagePyramid(self.disc_scales)

    def forward(self, batch: dict, tps) -> tuple[dict, dict]:
        w = self.weights
        source, driving = batch["source"], batch["driving"]
        kp_source, kp_driving = self.kp_detector(source), self.kp_detector(driving)
        out = self.generator(source, kp_driving=kp_driving, kp_source=kp_source)
        out.update(kp_source=kp_source, kp_driving=kp_driving)
        losses = {}
        if sum(w["perceptual"]) != 0:
            losses["perceptual"] = self.perceptual(to_loss_dtype(out["prediction"]), to_loss_dtype(driving))
        if w["perceptual_l1"] != 0:
            losses["perceptual_l1"] = w["perceptual_l1"] * L.perceptual_l1(
                to_loss_dtype(out["mini_render"]), to_loss_dtype(driving)
            )
        if w["generator_gan"] != 0:
            real_pyr, fake_pyr = self.pyramid(driving), self.pyramid(out["prediction"])
            with torch.no_grad():  # real features are targets only (the discriminator is frozen here)
                real = self.discriminator(real_pyr)
            fake = self.discriminator(fake_pyr)
            losses["generator_gan"] = w["generator_gan"] * L.lsgan_generator_loss(fake, self.disc_scales)
            if sum(w["feature_matching"]) != 0:
                losses["feature_matching"] = L.feature_matching_loss(
                    real, fake, w["feature_matching"], self.disc_scales
                )
        if tps is not None and (w["equivariance_value"] != 0 or w["equivariance_jacobian"] != 0):
            kp_transformed = self.kp_detector(tps.transform_frame(driving, backend=self.generator.ops_backend))
            if w["equivariance_value"] != 0:
                losses["equivariance_value"] = w["equivariance_value"] * L.equivariance_value_loss(
                    kp_driving, kp_transformed, tps
                )
            if w["equivariance_jacobian"] != 0:
                losses["equivariance_jacobian"] = w["equivariance_jacobian"] * L.equivariance_jacobian_loss(
                    kp_driving, kp_transformed, tps
                )
        if "pose" in batch and self.pose_editor is not None and w.get("pose_edit", 0) != 0:
            # The editor learns to move the source keypoints to the driving ones from the pose
            # change alone; the detector is not pulled towards the editor (both inputs detached).
            kp_s = {k: v.detach() for k, v in kp_source.items()}
            edited = self.pose_editor(kp_s, batch["pose"].to(kp_s["value"].dtype))
            losses["pose_edit"] = w["pose_edit"] * L.pose_edit_loss(
                edited["value"] - kp_s["value"], (kp_driving["value"] - kp_s["value"]).detach()
            )
        return losses, out


class DiscriminatorLoss(nn.Module):
    """``forward(driving, prediction) -> {"discriminator_gan": weighted scalar}`` (prediction detached)."""

    def __init__(self, model: FNeVR, train_params: dict):
        super().__init__()
        self.discriminator = model.discriminator
        self.pyramid = L.ImagePyramid(model.discriminator.scales)
        self.weight = train_params["loss_weights"]["discriminator_gan"]

    def forward(self, driving: Tensor, prediction: Tensor) -> dict:
        real = self.discriminator(self.pyramid(driving))
        fake = self.discriminator(self.pyramid(prediction.detach()))
        return {"discriminator_gan": self.weight * L.lsgan_discriminator_loss(real, fake, self.discriminator.scales)}


def sliced_tps(
    batch: int, total: int, offset: int, params: dict, generator: torch.Generator, device, dtype=torch.float32
):
    """The transforms of samples ``offset .. offset+batch`` out of ``total`` drawn at once, so a
    sample gets the same transform whatever the number of processes sharing the global batch."""
    tps = L.RandomTPS(
        total,
        sigma_affine=params["sigma_affine"],
        sigma_tps=params["sigma_tps"],
        points_tps=params["points_tps"],
        generator=generator,
        device=device,
        dtype=dtype,
    )
    tps.batch = batch
    tps.theta = tps.theta[offset : offset + batch]
    if tps.tps:
        tps.control_params = tps.control_params[offset : offset + batch]
    return tps
