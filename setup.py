"""Builds fnevr: the Python package, its C++ CPU extension (fnevr._C) and, where CUDA is at hand,
its CUDA extension (fnevr._C_cuda). The Triton kernels in kernels/ install as fnevr.kernels.

FNEVR_BUILD_CUDA=1 forces the CUDA extension on (the build fails loudly if it cannot be built; CI
forces it, so every CUDA source is compiled there), =0 forces it off; unset, it is built where a GPU
is present (and torch has CUDA and nvcc is found), for that GPU. A forced build with no GPU targets
TORCH_CUDA_ARCH_LIST, by default the release list RELEASE_ARCHS (Ampere to Blackwell, with PTX for
the newest, which the driver compiles for GPUs newer still); TORCH_CUDA_ARCH_LIST=release asks for
that list on any machine. Install with `pip install --no-build-isolation .` so the build uses the
torch you already have; `make wheel` builds a release wheel.

The compiled kernels use torch's C++ API, which has no stable ABI across torch releases: the
package's metadata pins torch to the release it was built with (TORCH_PIN below).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    # Some machines put a wrapper script at /usr/local/bin/nvcc; torch would then guess /usr/local.
    nvcc = shutil.which("nvcc")
    for home in ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            break

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def want_cuda() -> bool:
    flag = os.environ.get("FNEVR_BUILD_CUDA", "").strip().lower()
    if flag in ("1", "true", "on", "yes"):
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError(
                f"FNEVR_BUILD_CUDA=1 but the CUDA extension cannot be built: torch.version.cuda="
                f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME} (set CUDA_HOME to the toolkit with nvcc)"
            )
        return True
    if flag in ("0", "false", "off", "no"):
        return False
    # Unforced, only where it can run: compiling the CUDA kernels takes minutes on a small CPU.
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


# A100, A10/RTX 30, L4/RTX 40, H100/H200, B200, RTX 50 (and PTX for what comes after).
RELEASE_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
if os.environ.get("TORCH_CUDA_ARCH_LIST") == "release" or (
    want_cuda() and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available()
):
    os.environ["TORCH_CUDA_ARCH_LIST"] = RELEASE_ARCHS  # asked for (make wheel), or no GPU to read the arch from


def cuda_archs() -> str:
    """The GPU code the build makes, "sm_80,...,compute_120", recorded in fnevr._C_cuda (its
    cuda_archs) so that fnevr can tell, at import, whether the kernels run on the GPU at hand."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    codes = [flag.split("code=")[-1] for flag in _get_cuda_arch_flags() if "code=" in flag]
    return ",".join(sorted(set(codes), key=lambda c: (c.startswith("compute"), int("".join(filter(str.isdigit, c))))))


# The torch release the compiled kernels were built against, pinned to its minor version
# (patch releases keep the C++ ABI): what the wheel's metadata requires.
TORCH_PIN = "torch=={}.{}.*".format(*torch.__version__.split("+")[0].split(".")[:2])
DEPENDENCIES = [
    TORCH_PIN,
    "torchvision>=0.19",
    "numpy",
    "pillow",
    "pyyaml",
    "imageio>=2.31",
    "imageio-ffmpeg",
    "tqdm",
    "torchmetrics>=1.4",
    "tensorboard",
]

# -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC will not
# turn a choice such as `z > 0 ? 1 : slope` into a vector select, leaving such loops scalar and branchy.
# -ffp-contract=off: loops also compiled for FMA machines (spade_norm_cpu.cpp) round as the baseline does.
cxx_flags = ["-O3", "-fno-trapping-math", "-ffp-contract=off"]
# at::parallel_for is inline: without OpenMP in this build it runs serially, whatever torch's threads.
openmp = [] if os.name == "nt" else ["-fopenmp"]
# The C++ runtime must come from the shared libstdc++.so.6 that torch and the process already use.
# A link that finds only libstdc++.a (no libstdc++.so symlink for the compiler) or that is given
# -static-libstdc++ puts a private copy of iostreams and locales in the module, and the two copies'
# facet ids disagree: formatting a number in a TORCH_CHECK message then truncates the message or,
# with a g++ 13 build under a newer libstdc++ (the H100 machine), crashes in ostream::_M_insert<long>.
# Naming the shared library resolves every libstdc++ symbol against it before the driver's -lstdc++.
shared_libstdcxx = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
include_dirs = [os.path.abspath("csrc")]
# Both modules use Python's stable ABI only (a module object, no pybind11): one wheel (abi3) serves
# every CPython from 3.10 that its torch supports.
limited_api = [("Py_LIMITED_API", "0x030A0000")]

ext_modules = [
    CppExtension(
        "fnevr._C",
        ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp")),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + openmp},
        extra_link_args=openmp + shared_libstdcxx,
        define_macros=limited_api,
        py_limited_api=True,
    )
]
if want_cuda():
    ext_modules.append(
        CUDAExtension(
            "fnevr._C_cuda",
            ["csrc/cuda_module.cpp"] + sorted(glob.glob("csrc/*/*_cuda.cu")),
            include_dirs=include_dirs,
            # for the C++ module file only: nvcc would split the list at its commas
            extra_compile_args={"cxx": cxx_flags + [f"-DFNEVR_CUDA_ARCHS={cuda_archs()}"], "nvcc": nvcc_flags},
            extra_link_args=shared_libstdcxx,
            define_macros=limited_api,
            py_limited_api=True,
        )
    )

setup(
    install_requires=DEPENDENCIES,
    packages=[
        "fnevr",
        "fnevr.ops",
        "fnevr.nn",
        "fnevr.kernels",
        "fnevr.model",
        "fnevr.train",
        "fnevr.data",
        "fnevr.losses",
    ],
    package_data={"fnevr": ["configs/*.yaml"]},
    package_dir={"fnevr.kernels": "kernels"},
    ext_modules=ext_modules,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
