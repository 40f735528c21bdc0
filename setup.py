"""Builds the compiled parts of stdet_kernels from csrc/.

The C++ CPU extension (stdet_kernels._C) is always built. The CUDA extension
(stdet_kernels._C_cuda) is built whenever a CUDA toolkit is found; STDET_FORCE_CUDA=1 makes a
missing toolkit an error, STDET_SKIP_CUDA=1 skips it. Choose the GPU architectures with
TORCH_CUDA_ARCH_LIST (e.g. "8.0;8.6;9.0").
"""

import glob
import os
import sysconfig

from setuptools import setup


def _find_cuda_home() -> None:
    """Point torch at a full toolkit when nvcc on PATH is only a wrapper script.

    torch guesses CUDA_HOME as the parent of nvcc's folder; with /usr/local/bin/nvcc that is
    /usr/local, which has no lib64/libcudart. The conventional /usr/local/cuda is the toolkit.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


_find_cuda_home()

from torch.utils.cpp_extension import (  # noqa: E402  (needs CUDA_HOME set first)
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs() -> list[str]:
    """Headers of the CUDA libraries torch was built against (pip's nvidia-* wheels).

    Passed with -idirafter so the toolkit's own headers win where both exist.
    """
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include")))


def extensions() -> list:
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    result = [
        CppExtension(
            "stdet_kernels._C",
            sources=[os.path.join(CSRC, "stdet_cpu.cpp")],
            include_dirs=[os.path.join(HERE, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _flag("STDET_SKIP_CUDA"):
        return result
    if CUDA_HOME is None:
        if _flag("STDET_FORCE_CUDA"):
            raise RuntimeError("STDET_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        print("stdet: no CUDA toolkit found, building the CPU extension only")
        return result
    nvcc_flags = ["-O3", "--fmad=false"]
    for include in _nvidia_include_dirs():
        nvcc_flags += ["-Xcompiler", f"-idirafter{include}"]
    result.append(
        CUDAExtension(
            "stdet_kernels._C_cuda",
            sources=[os.path.join(CSRC, "stdet_cuda.cu")],
            include_dirs=[os.path.join(HERE, CSRC)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        )
    )
    return result


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
