"""Run fnevr's model outside PyTorch eager: ``torch.export`` programs, AOTInductor packages, ONNX.

The per-frame loop of an animation has two networks, so each format holds two graphs:

- ``kp_detector``: ``image [B, 3, H, W]`` in [0, 1] -> ``value [B, K, 2]``, ``jacobian [B, K, 2, 2]``
  (no jacobian for configs without ``estimate_jacobian``);
- ``generator``: ``source [B, 3, H, W]``, ``kp_source``, ``kp_driving`` ``[B, K, 2]``,
  ``kp_source_jacobian``, ``kp_driving_jacobian`` ``[B, K, 2, 2]`` -> ``prediction [B, 3, H, W]``.

The source's keypoints are computed once; each driving frame then needs ``kp_detector`` and
``generator``, with relative motion (``fnevr.animate.relative_keypoints``) applied in between if
wanted. The batch is dynamic (1 to 1024); H and W are the config's frame size.

- :func:`export_program`: a ``torch.export.ExportedProgram`` with fnevr's fused ops inside as
  ``fnevr::`` custom ops (real kernels in eager, fake kernels while tracing).
- :func:`export_aoti`: ``kp_detector.pt2`` and ``generator.pt2``, compiled by AOTInductor;
  ``torch._inductor.aoti_load_package(path)`` runs one without fnevr's model code (``import fnevr``
  first: it registers the fused ops' kernels, which the compiled graph calls).
- :func:`export_onnx`: ``kp_detector.onnx`` and ``generator.onnx`` on standard ONNX ops (opset >= 16
  for ``GridSample``): each fused op is replaced by its decomposition (``fnevr.ops.decompositions``)
  and the 2x2 matrix inverse of the keypoint Jacobians by its closed form.

Every artefact records the fnevr version, the checkpoint format version and the config
(:func:`metadata`): ONNX in ``metadata_props``, AOTInductor in the package's metadata.

>>> import fnevr, fnevr.export
>>> model = fnevr.FNeVR("small", training_modules=False).eval()
>>> paths = fnevr.export.export_onnx(model, "exported/")  # doctest: +SKIP
"""

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from . import _version, checkpoint, ops
from ._files import atomic_path

PARTS = ("kp_detector", "generator")
MAX_BATCH = 1024
DEFAULT_OPSET = 20


class KeypointGraph(nn.Module):
    """The keypoint detector with tensor outputs: ``image`` -> ``(value, jacobian)`` (or ``(value,)``)."""

    def __init__(self, kp_detector: nn.Module):
        super().__init__()
        self.kp_detector = kp_detector

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        kp = self.kp_detector(image)
        return (kp["value"], kp["jacobian"]) if "jacobian" in kp else (kp["value"],)


class GeneratorGraph(nn.Module):
    """The generator with tensor inputs and output: ``(source, kp_source, kp_driving[,
    kp_source_jacobian, kp_driving_jacobian])`` -> ``prediction``."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(
        self,
        source: Tensor,
        kp_source: Tensor,
        kp_driving: Tensor,
        kp_source_jacobian: Tensor | None = None,
        kp_driving_jacobian: Tensor | None = None,
    ) -> Tensor:
        kp_s, kp_d = {"value": kp_source}, {"value": kp_driving}
        if kp_source_jacobian is not None and kp_driving_jacobian is not None:
            kp_s["jacobian"], kp_d["jacobian"] = kp_source_jacobian, kp_driving_jacobian
        return self.generator(source, kp_driving=kp_d, kp_source=kp_s)["prediction"]


def input_names(model, part: str) -> list[str]:
    """The graph inputs of `part`, in order (the ONNX graphs' input names)."""
    jacobian = _has_jacobian(model)
    if part == "kp_detector":
        return ["image"]
    kp = ["kp_source", "kp_driving", "kp_source_jacobian", "kp_driving_jacobian"]
    return ["source"] + (kp if jacobian else kp[:2])


def output_names(model, part: str) -> list[str]:
    """The graph outputs of `part`, in order."""
    if part == "kp_detector":
        return ["value", "jacobian"] if _has_jacobian(model) else ["value"]
    return ["prediction"]


def _has_jacobian(model) -> bool:
    return bool(model.config["model_params"]["common_params"].get("estimate_jacobian", False))


def example_inputs(model, part: str, batch: int = 2) -> tuple[Tensor, ...]:
    """Random inputs of the config's frame size for `part`, on the model's device and dtype."""
    p = next(model.parameters())
    H, W = model.config.get("dataset_params", {}).get("frame_shape", [256, 256, 3])[:2]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, H, W, generator=g).to(p)
    if part == "kp_detector":
        return (image,)
    with torch.no_grad():
        kp = KeypointGraph(model.kp_detector)(image)
        moved = [t + 0.05 * torch.randn(t.shape, generator=g).to(t) for t in kp]
    return (image, kp[0], moved[0], *kp[1:], *moved[1:])


def graph(model, part: str) -> nn.Module:
    """`part` of `model` ("kp_detector" or "generator") as a module with tensor inputs and outputs."""
    if part == "kp_detector":
        return KeypointGraph(model.kp_detector)
    if part == "generator":
        return GeneratorGraph(model.generator)
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def export_program(model, part: str, inputs: tuple[Tensor, ...] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of `part` of `model` (in eval mode), with a dynamic batch and fnevr's fused
    ops as ``fnevr::`` custom ops.

    The graph is traced with gradients enabled (nothing is recorded: export is functional) so
    that SPADE takes its plain upsample-then-convolve path: its eager no-grad shortcut
    (``fnevr.nn.upsampled_conv``) is hundreds of gathers and scatters in a graph, which made the
    small model's AOTInductor compile take 100 s instead of 46 and its ONNX export 46 s instead of 10."""
    if model.training:
        raise ValueError("export the model in eval mode (model.eval()): training mode updates batch statistics")
    inputs = example_inputs(model, part) if inputs is None else inputs
    if inputs[0].shape[0] < 2:  # torch.export would specialise the graph to batch 1
        raise ValueError(f"example inputs for a dynamic batch need a batch of 2 or more, got {inputs[0].shape[0]}")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.enable_grad():
        return torch.export.export(graph(model, part), inputs, dynamic_shapes=[{0: batch}] * len(inputs))


def metadata(model) -> dict[str, str]:
    """What every exported artefact records: fnevr's version, the checkpoint format, the config."""
    return {
        "fnevr_version": _version.__version__,
        "fnevr_checkpoint_version": str(checkpoint.VERSION),
        "torch_version": torch.__version__,
        "config": json.dumps(model.config, sort_keys=True),
    }


def export_aoti(model, folder: str | Path) -> dict[str, Path]:
    """Compile each graph with AOTInductor, for the model's device, into ``kp_detector.pt2`` and
    ``generator.pt2`` in `folder`; returns the paths by part. Run one with
    ``torch._inductor.aoti_load_package(path)(*inputs)`` (after ``import fnevr``)."""
    folder, options, paths = Path(folder), {"aot_inductor.metadata": metadata(model)}, {}
    for part in PARTS:
        program = export_program(model, part)
        paths[part] = folder / f"{part}.pt2"
        with atomic_path(paths[part]) as tmp:  # a package appears only once complete
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=options)
    return paths


def _inverse_2x2(a: Tensor) -> Tensor:
    """Closed-form inverse of [..., 2, 2] matrices (ONNX has no matrix inverse)."""
    if a.shape[-2:] != (2, 2):
        raise NotImplementedError(f"export inverts 2x2 matrices only (the keypoint Jacobians), got {tuple(a.shape)}")
    p, q, r, s = a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1]
    rows = torch.stack([torch.stack([s, -q], -1), torch.stack([-r, p], -1)], -2)
    return rows / (p * s - q * r)[..., None, None]


def onnx_decompositions() -> dict:
    """fnevr's fused ops and ``torch.inverse`` (of 2x2 matrices) as ops that ONNX has."""
    return {**ops.decompositions(), torch.ops.aten.inverse.default: _inverse_2x2}


def export_onnx(model, folder: str | Path, *, opset: int = DEFAULT_OPSET, check: bool = True) -> dict[str, Path]:
    """Write ``kp_detector.onnx`` and ``generator.onnx`` of `model` (fp32, eval) into `folder`.

    Needs ``onnx`` and ``onnxscript`` (``pip install fnevr[onnx]``). With `check` and
    ``onnxruntime`` installed, each graph is run by ONNX Runtime on the CPU and compared with the
    PyTorch model (batch 2): a difference above 1e-4 of the largest output raises, and the file
    is not written. Returns the paths by part."""
    if opset < 16:
        raise ValueError(f"opset must be at least 16 (the first with GridSample), got {opset}")
    folder = Path(folder)
    meta, table, paths = metadata(model), onnx_decompositions(), {}
    for part in PARTS:
        inputs = example_inputs(model, part)
        program = export_program(model, part, inputs).run_decompositions(table)
        onnx_program = torch.onnx.export(
            program,
            inputs,
            input_names=input_names(model, part),
            output_names=output_names(model, part),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        assert onnx_program is not None
        for key, value in meta.items():
            onnx_program.model.metadata_props[key] = value
        paths[part] = folder / f"{part}.onnx"
        with atomic_path(paths[part]) as tmp:  # written only if it passes the check
            onnx_program.save(str(tmp))
            if check:
                check_onnx(model, part, tmp, inputs)
    return paths


def check_onnx(model, part: str, path: str | Path, inputs: tuple[Tensor, ...], tolerance: float = 1e-4) -> float:
    """Run the ONNX graph at `path` with ONNX Runtime (CPU) on `inputs` and return the largest
    difference from PyTorch, relative to the largest output; raises if above `tolerance`. Skipped
    (returns NaN) when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return float("nan")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.cpu().numpy() for n, t in zip(input_names(model, part), inputs)})
    with torch.no_grad():
        want = graph(model, part)(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for name, w, g in zip(output_names(model, part), want, got):
        scale = float(w.abs().max()) or 1.0
        err = float((torch.from_numpy(g) - w.cpu()).abs().max()) / scale
        if not err <= tolerance:  # NaN fails too
            raise RuntimeError(f"{path}: ONNX Runtime's {name} differs from PyTorch's by {err:.2e} of its largest")
        worst = max(worst, err)
    return worst
