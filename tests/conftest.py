"""Test set-up. Triton runs under its interpreter on the CPU, which must be chosen before Triton is
first imported, so it is set here, before any test module imports stdet_kernels."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
