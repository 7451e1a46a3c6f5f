"""The op codes agree everywhere: fnevr/ops/_codes.py (Python), csrc/common/codes.h (C++ and CUDA)
and kernels/_common.py (Triton); and the compiled kernels refuse a code outside the table."""

import re
import sys
from pathlib import Path

import pytest
import torch

import fnevr
from fnevr.ops import _codes

ROOT = Path(__file__).resolve().parents[1]


def _camel(name: str) -> str:
    """LEAKY_RELU -> kLeakyRelu (the C++ spelling)."""
    return "k" + "".join(part.capitalize() for part in name.split("_"))


@pytest.mark.parametrize("enum", [_codes.Activation, _codes.Mode, _codes.Padding], ids=lambda e: e.__name__)
def test_cpp_enums_equal_the_python_ones(enum):
    header = (ROOT / "csrc/common/codes.h").read_text()
    body = re.search(rf"enum {enum.__name__} : int \{{([^}}]*)\}}", header)
    assert body, f"csrc/common/codes.h has no enum {enum.__name__}"
    cpp = {name.strip(): int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body.group(1))}
    assert cpp == {_camel(member.name): member.value for member in enum}


def test_triton_constants_equal_the_python_ones():
    pytest.importorskip("triton")
    from fnevr.kernels import _common

    found = 0
    for enum in (_codes.Activation, _codes.Mode, _codes.Padding):
        for member in enum:
            constant = getattr(_common, member.name, None)
            if constant is not None:
                found += 1
                assert constant.value == member.value, member
    assert found >= 6  # the codes the kernels compare against (none and zeros are their `else`)


def test_each_op_maps_its_names_to_the_shared_codes():
    composite, grid_sample, spade_norm = (
        sys.modules[f"fnevr.ops.{op}"] for op in ("composite", "grid_sample", "spade_norm")
    )
    for mapping in (composite.ACTIVATIONS, spade_norm.ACTIVATIONS):
        for name, code in mapping.items():
            assert code == _codes.Activation[(name or "none").upper()]
    assert grid_sample.MODES == {m.name.lower(): m.value for m in _codes.Mode}
    assert grid_sample.PADDINGS == {p.name.lower(): p.value for p in _codes.Padding}


@pytest.mark.skipif(fnevr.ops.backends()["cpu"] != "available", reason="the CPU extension is not built")
def test_compiled_kernels_refuse_a_code_outside_their_table():
    color, density = torch.rand(3, 8, 4), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"activation must be 0 \(none\), 1 \(relu\) or 3 \(softplus\), got 2"):
        torch.ops.fnevr._composite_forward(color, density, True, int(_codes.Activation.LEAKY_RELU))
    x = torch.rand(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"activation must be 0 \(none\), 1 \(relu\) or 2 \(leaky_relu\), got 3"):
        torch.ops.fnevr._spade_norm_instance_forward(x, x, x, 1e-5, int(_codes.Activation.SOFTPLUS), 0.2)
