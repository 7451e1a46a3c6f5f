"""Training losses (FNeVR paper appendix B.2, after FOMM): multi-scale VGG19 perceptual loss,
LSGAN and feature matching, keypoint equivariance under random TPS, pose edit, render L1."""

from .gan import feature_matching_loss, lsgan_discriminator_loss, lsgan_generator_loss
from .keypoints import equivariance_jacobian_loss, equivariance_value_loss, pose_edit_loss
from .perceptual import PerceptualPyramidLoss, VGG19Features, find_vgg19_weights, perceptual_l1
from .pyramid import ImagePyramid
from .tps import RandomTPS

__all__ = [
    "ImagePyramid",
    "PerceptualPyramidLoss",
    "RandomTPS",
    "VGG19Features",
    "equivariance_jacobian_loss",
    "equivariance_value_loss",
    "feature_matching_loss",
    "find_vgg19_weights",
    "lsgan_discriminator_loss",
    "lsgan_generator_loss",
    "perceptual_l1",
    "pose_edit_loss",
]
