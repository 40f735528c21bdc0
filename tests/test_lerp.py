"""The multi-tensor moving average against the reference, for every backend."""

import pytest
import torch
from helpers import Target, assert_verbose_close, flash_tolerance

import stdet_kernels

SIZES = (1, 2, 1023, 4097, 100_003)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
@pytest.mark.parametrize("alpha", (0.01, 0.5, 1.0))
def test_lerp_matches_reference(target: Target, dtype: torch.dtype, alpha: float) -> None:
    generator = torch.Generator().manual_seed(0)
    averages = [torch.randn(n, generator=generator).to(dtype) for n in SIZES]
    samples = [torch.randn(n, generator=generator).to(dtype) for n in SIZES]
    expected_high = [
        a.double() + alpha * (s.double() - a.double()) for a, s in zip(averages, samples, strict=True)
    ]
    expected_low = [a + alpha * (s - a) for a, s in zip(averages, samples, strict=True)]
    got = [a.clone().to(target.device) for a in averages]
    with stdet_kernels.use_backend(target.backend):
        stdet_kernels.lerp_(got, list(target.put(*samples)), alpha)
        assert stdet_kernels.last_backend() == target.backend
    got = [g.cpu() for g in got]
    atol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-3
    for k, (g, low, high) in enumerate(zip(got, expected_low, expected_high, strict=True)):
        assert g.dtype == dtype
        assert_verbose_close(f"averages[{k}]", g, high, flash_tolerance(low, high, atol))


def test_lerp_groups_mixed_dtypes_and_shapes(target: Target) -> None:
    """A list mixing dtypes, shapes and a non-contiguous average is updated in place, every tensor."""
    averages = [
        torch.zeros(3, 5),
        torch.zeros(7, dtype=torch.bfloat16),
        torch.zeros(4, 6),
        torch.zeros(()),
    ]
    averages = list(target.put(*averages))
    averages[2] = averages[2].t()
    samples = [torch.ones_like(a) for a in averages]
    originals = [a.data_ptr() for a in averages]
    with stdet_kernels.use_backend(target.backend):
        stdet_kernels.lerp_(averages, samples, 0.25)
    for average, pointer in zip(averages, originals, strict=True):
        assert average.data_ptr() == pointer
        assert torch.all(average.cpu() == 0.25), average


def test_lerp_empty_list_is_a_no_op() -> None:
    stdet_kernels.lerp_([], [], 0.5)
