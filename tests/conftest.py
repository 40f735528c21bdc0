"""Test set-up, done before any test module imports torch or stdet_kernels.

- Triton runs under its interpreter on the CPU, which must be chosen before Triton is first imported.
- Inductor's FX graph cache (torch 2.14) does not key on the vector ISA that ATEN_CPU_CAPABILITY
  selects: a graph compiled under one setting is served under another and computes garbage (the
  torch.compile tests then fail, or the process crashes). The suite runs under several code paths
  (.ci/cross_setting.sh, issue 10), so a run that sets ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA gets
  a cache of its own, unless TORCHINDUCTOR_CACHE_DIR is set; the default setting keeps the default.
"""

import getpass
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")

_CODE_PATH = [
    f"{name}-{os.environ[name]}"
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
    if name in os.environ
]
if _CODE_PATH and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{'_'.join(_CODE_PATH)}"
    )


import pytest  # noqa: E402  (after TRITON_INTERPRET is chosen)
from helpers import Target, require, targets  # noqa: E402


@pytest.fixture(params=targets(), ids=str)
def target(request) -> Target:
    """Each backend and device the suite can run here (skipped where unavailable)."""
    return require(request.param)
