"""Backend discovery, forcing, fallback when an extension is missing, and the build itself."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import stdet_kernels


def test_cpu_backends_are_available() -> None:
    """`make test` builds the C++ extension, and conftest turns on Triton's interpreter."""
    available = stdet_kernels.available_backends()
    assert "torch" in available
    assert "cpp" in available, stdet_kernels.unavailable_reasons()
    assert "triton" in available, stdet_kernels.unavailable_reasons()
    assert available == [b for b in stdet_kernels.BACKENDS if b in available]


def _cuda_toolkit_present() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


@pytest.mark.skipif(
    not _cuda_toolkit_present() or os.environ.get("STDET_SKIP_CUDA") == "1",
    reason="no CUDA toolkit: the CUDA extension is not built",
)
def test_cuda_extension_was_compiled_and_links() -> None:
    """With a toolkit present the CUDA extension is built; importing it proves it linked."""
    assert "cuda" not in stdet_kernels.unavailable_reasons(), stdet_kernels.unavailable_reasons()
    from stdet_kernels import _C_cuda

    ops = ("reconstruct", "reconstruct_sma_", "reconstruct_backward", "lerp_")
    compact = (
        "reconstruct_compact",
        "reconstruct_compact_sma_",
        "reconstruct_compact_backward",
        "reconstruct_compact_backward_sensitivity_",
    )
    for name in (*ops, *compact):
        assert callable(getattr(_C_cuda, name))


def test_default_dispatch_on_cpu_is_cpp() -> None:
    inputs = (
        torch.zeros(4),
        torch.full((4,), 255, dtype=torch.uint8),
        torch.zeros(4),
        torch.zeros(4),
        torch.zeros(1),
    )
    stdet_kernels.reconstruct(*inputs)
    assert stdet_kernels.last_backend() == "cpp"


def test_use_backend_validates_and_restores() -> None:
    with pytest.raises(ValueError, match="^backend: expected one of"), stdet_kernels.use_backend("fortran"):
        pass
    inputs = (
        torch.zeros(4),
        torch.full((4,), 255, dtype=torch.uint8),
        torch.zeros(4),
        torch.zeros(4),
        torch.zeros(1),
    )
    with stdet_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="use_backend\\('cuda'\\)"):
        stdet_kernels.reconstruct(*inputs)
    with stdet_kernels.use_backend("torch"):
        stdet_kernels.reconstruct(*inputs)
        assert stdet_kernels.last_backend() == "torch"
    stdet_kernels.reconstruct(*inputs)
    assert stdet_kernels.last_backend() == "cpp"


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_falls_back_and_says_so_when_the_extension_is_missing() -> None:
    result = _run_python(
        "import sys, warnings\n"
        "sys.modules['stdet_kernels._C'] = None  # as if the C++ extension had not been built\n"
        "import torch, stdet_kernels\n"
        "assert 'cpp' not in stdet_kernels.available_backends()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    code = torch.tensor([255, 254, 0], dtype=torch.uint8)\n"
        "    a, b = torch.full((3,), 2.0), torch.full((3,), 5.0)\n"
        "    w = stdet_kernels.reconstruct(torch.ones(3), code, a, b, torch.tensor([4.0]))\n"
        "assert w.tolist() == [1.0, 5.0, 13.0], w\n"
        "assert stdet_kernels.last_backend() == 'torch'\n"
        "assert any(\"'cpp' backend is unavailable\" in str(c.message) for c in caught), caught\n"
        "print('ok')\n"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_import_works_without_triton() -> None:
    result = _run_python(
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import stdet_kernels\n"
        "assert 'triton' not in stdet_kernels.available_backends()\n"
        "assert 'triton' in stdet_kernels.unavailable_reasons()\n"
        "print('ok')\n"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_cli_lists_backends() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stdet", "backends"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(stdet_kernels.BACKENDS)
    assert any(line.startswith("cpp") and "available" in line and "unavailable" not in line for line in lines)


def test_triton_kernels_read_only_constexpr_globals() -> None:
    """Compiled Triton (on a GPU) rejects a kernel that reads a plain module global; the interpreter that
    CI runs accepts it. So check every kernel's globals here: each must be a tl.constexpr, a jitted
    function or a module (tl, triton). A GPU run found FREE and DUMMY read as plain ints."""
    pytest.importorskip("triton")
    import types

    import triton.language as tl

    from stdet_kernels import triton_backend

    def jitted(value: object) -> bool:  # a JITFunction, or the interpreter's stand-in for one
        return type(value).__module__.startswith("triton.") and callable(getattr(value, "fn", None))

    kernels = {name: value for name, value in vars(triton_backend).items() if jitted(value)}
    assert len(kernels) >= 6, sorted(kernels)
    offenders = []
    for name, kernel in kernels.items():
        fn = kernel.fn
        for global_name in fn.__code__.co_names:
            if global_name not in fn.__globals__:
                continue  # an attribute name (tl.load), not a global
            value = fn.__globals__[global_name]
            if not (isinstance(value, tl.constexpr | types.ModuleType) or jitted(value)):
                offenders.append(f"{name} reads {global_name} = {value!r}")
    assert not offenders, offenders
