r"""Keypoint losses: equivariance under a random TPS (FOMM) and FNeVR's pose edit.

Keypoints are dicts ``{"value": [B, K, 2], "jacobian": [B, K, 2, 2]}`` in ``[-1, 1]`` coordinates.
With ``kp_driving = kp(x)``, ``kp_transformed = kp(T.transform_frame(x))`` and the transform ``T``:

.. math::

    L_{value} = \mathrm{mean}\,\lvert p_d - T(p_t) \rvert, \qquad
    L_{jacobian} = \mathrm{mean}\,\lvert I - J_d^{-1} \, (\nabla T(p_t)\, J_t) \rvert

Both are zero for a perfectly equivariant detector. Example::

    >>> import torch
    >>> from fnevr.losses import RandomTPS, equivariance_value_loss, equivariance_jacobian_loss
    >>> tps = RandomTPS(2, sigma_affine=0.05, sigma_tps=0.005, points_tps=5)
    >>> kp_t = {"value": torch.rand(2, 10, 2) - 0.5, "jacobian": torch.eye(2).repeat(2, 10, 1, 1)}
    >>> kp_d = {"value": tps.warp_coordinates(kp_t["value"]),
    ...         "jacobian": tps.jacobian(kp_t["value"]) @ kp_t["jacobian"]}
    >>> float(equivariance_value_loss(kp_d, kp_t, tps)) < 1e-6
    True
    >>> float(equivariance_jacobian_loss(kp_d, kp_t, tps)) < 1e-5
    True
"""

import torch
from torch import Tensor

from ._precision import loss_dtype, to_loss_dtype
from .tps import RandomTPS


def _check_kp(kp, name, jacobian=False):
    if not isinstance(kp, dict) or "value" not in kp or (jacobian and "jacobian" not in kp):
        wanted = "'value' [B, K, 2]" + (" and 'jacobian' [B, K, 2, 2]" if jacobian else "")
        raise ValueError(f"{name}: expected a dict with {wanted}")
    if kp["value"].dim() != 3 or kp["value"].shape[-1] != 2:
        raise ValueError(f"{name}['value']: expected [B, K, 2]; got {tuple(kp['value'].shape)}")
    if jacobian and tuple(kp["jacobian"].shape) != tuple(kp["value"].shape) + (2,):
        raise ValueError(
            f"{name}['jacobian']: expected {tuple(kp['value'].shape) + (2,)}; got {tuple(kp['jacobian'].shape)}"
        )


def equivariance_value_loss(kp_driving: dict, kp_transformed: dict, transform: RandomTPS) -> Tensor:
    """:math:`\\mathrm{mean}|p_d - T(p_t)|` (module doc); a scalar."""
    _check_kp(kp_driving, "kp_driving")
    _check_kp(kp_transformed, "kp_transformed")
    dtype = loss_dtype(kp_driving["value"])
    warped = transform.warp_coordinates(kp_transformed["value"].to(dtype))
    return (kp_driving["value"].to(dtype) - warped).abs().mean()


def equivariance_jacobian_loss(kp_driving: dict, kp_transformed: dict, transform: RandomTPS) -> Tensor:
    """:math:`\\mathrm{mean}|I - J_d^{-1} \\nabla T(p_t) J_t|` (module doc); a scalar. Computed in
    fp32 (fp64 for fp64 input)."""
    _check_kp(kp_driving, "kp_driving", jacobian=True)
    _check_kp(kp_transformed, "kp_transformed", jacobian=True)
    dtype = loss_dtype(kp_driving["jacobian"])
    transformed = transform.jacobian(kp_transformed["value"].to(dtype)) @ kp_transformed["jacobian"].to(dtype)
    product = torch.linalg.inv(kp_driving["jacobian"].to(dtype)) @ transformed
    return (torch.eye(2, dtype=dtype, device=product.device) - product).abs().mean()


def pose_edit_loss(predicted_change, target_change) -> Tensor:
    """L1 between the predicted and the target keypoint change of a pose edit:
    :math:`\\mathrm{mean}|\\Delta\\hat p - \\Delta p|`. Arguments are tensors of equal shape (e.g.
    ``[B, K, 2]``) or keypoint dicts (their ``"value"`` is used)."""
    if isinstance(predicted_change, dict):
        predicted_change = predicted_change["value"]
    if isinstance(target_change, dict):
        target_change = target_change["value"]
    if predicted_change.shape != target_change.shape:
        raise ValueError(
            f"pose_edit_loss: predicted_change {tuple(predicted_change.shape)} and target_change "
            f"{tuple(target_change.shape)} differ in shape"
        )
    return (to_loss_dtype(predicted_change) - to_loss_dtype(target_change.detach())).abs().mean()
