"""The wheel: build it, install it into a fresh virtual environment, run every op from there."""

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK_OPS = textwrap.dedent(
    """
    import os, sys
    import torch
    import stdet_kernels
    assert sys.prefix in stdet_kernels.__file__, ("not the installed wheel", stdet_kernels.__file__)
    assert "cpp" in stdet_kernels.available_backends(), stdet_kernels.unavailable_reasons()
    code = torch.tensor([255, 254, 0, 1, 1], dtype=torch.uint8)
    a = torch.tensor([9.0, 9.0, 2.0, -1.0, 0.5])
    b = torch.tensor([9.0, 7.0, 1.0, 3.0, 0.0])
    expected = torch.tensor([0.5, 7.0, 9.0, 1.0, 1.0])
    for backend in stdet_kernels.available_backends():
        with stdet_kernels.use_backend(backend):
            value = torch.full((5,), 0.5, requires_grad=True)
            refs = torch.tensor([4.0, 2.0], requires_grad=True)
            w = stdet_kernels.reconstruct(value, code, a, b, refs)
            assert torch.equal(w, expected), (backend, w)
            w.backward(torch.ones(5))
            assert value.grad.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0], (backend, value.grad)
            assert refs.grad.tolist() == [2.0, -0.5], (backend, refs.grad)
            sma = torch.zeros(5)
            w = stdet_kernels.reconstruct_sma_(value.detach(), code, a, b, refs.detach(), sma, 0.5)
            assert torch.equal(sma, expected / 2), (backend, sma)
            averages = [torch.zeros(3), torch.zeros(2, dtype=torch.bfloat16)]
            stdet_kernels.lerp_(averages, [torch.ones(3), torch.ones(2, dtype=torch.bfloat16)], 0.25)
            assert all(torch.all(t == 0.25) for t in averages), (backend, averages)
            assert stdet_kernels.last_backend() == backend
        print("ok", backend)
    """
)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_every_op(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # The CUDA compile is proven by the editable build of `make test`; this wheel is CPU-only to keep
    # the test short. `make wheel` builds the CUDA extension too where a toolkit is present.
    build_env = os.environ | {"STDET_SKIP_CUDA": "1"}
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True,
        env=build_env,
        capture_output=True,
    )
    (wheel,) = dist.glob("stdet-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Reuse this environment's torch (several GB) rather than installing it again. A plain path in a
    # .pth file: the .pth files over there (this checkout's editable install) are not processed.
    (site / "parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )

    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [python, "-c", CHECK_OPS], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "triton", "ok", "cpp", "ok", "torch"], result.stdout

    cli = subprocess.run([venv / "bin" / "stdet", "backends"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0 and "cpp" in cli.stdout, cli.stderr

    # The demo's pretrained model travels in the wheel as package data, and the installed demo finds it.
    shipped = subprocess.run(
        [
            python,
            "-c",
            "from stdet.demo import PRETRAINED, check_pretrained; check_pretrained(); print(PRETRAINED)",
        ],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
    )
    assert shipped.returncode == 0, shipped.stderr
    assert Path(shipped.stdout.strip()).is_relative_to(site), shipped.stdout
