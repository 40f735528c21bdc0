"""Bad inputs raise ValueError or TypeError naming the argument."""

import math

import pytest
import torch
from helpers import Target, make_inputs, require, targets

import stdet_kernels


def _args(n: int = 8, modes: int = 3) -> dict:
    inputs = make_inputs(n, modes, "mixed")
    return dict(value=inputs.value, code=inputs.code, a=inputs.a, b=inputs.b, refs=inputs.refs)


@pytest.mark.parametrize(
    ("argument", "replacement", "error"),
    [
        ("value", torch.zeros(8, dtype=torch.float64), TypeError),
        ("value", torch.zeros(8, dtype=torch.int32), TypeError),
        ("value", [0.0] * 8, TypeError),
        ("code", torch.zeros(8, dtype=torch.int64), TypeError),
        ("code", torch.zeros(9, dtype=torch.uint8), ValueError),
        ("a", torch.zeros(8, dtype=torch.bfloat16), TypeError),
        ("a", torch.zeros(2, 4), ValueError),
        ("b", torch.zeros(7), ValueError),
        ("b", None, TypeError),
        ("refs", torch.zeros(3, 1), ValueError),
        ("refs", torch.zeros(255), ValueError),
        ("refs", torch.zeros(3, dtype=torch.int64), TypeError),
        ("a", torch.zeros(8, device="meta"), ValueError),
        ("refs", torch.zeros(3, device="meta"), ValueError),
    ],
)
def test_reconstruct_rejects_bad_argument(argument: str, replacement, error: type) -> None:
    args = _args()
    args[argument] = replacement
    with pytest.raises(error, match=f"^{argument}: "):
        stdet_kernels.reconstruct(**args)


@pytest.mark.parametrize("target", targets(), ids=str)
def test_code_naming_a_missing_mode(target: Target) -> None:
    require(target)
    args = _args(modes=3)
    args["code"] = args["code"].clone()
    args["code"][5] = 7
    args = {name: t.to(target.device) for name, t in args.items()}
    with (
        stdet_kernels.use_backend(target.backend),
        pytest.raises(ValueError, match="^code: value 7 names mode 7, but refs has 3 modes"),
    ):
        stdet_kernels.reconstruct(**args)
    sma = torch.zeros(8, device=target.device)
    with stdet_kernels.use_backend(target.backend), pytest.raises(ValueError, match="^code: value 7"):
        stdet_kernels.reconstruct_sma_(**args, sma=sma, alpha=0.5)


def test_code_check_sees_in_place_changes() -> None:
    """The check is cached per version of code: writing into code in place must trigger it again."""
    args = _args(modes=3)
    code = args["code"].clone()
    args["code"] = code
    stdet_kernels.reconstruct(**args)
    code[0] = 200
    with pytest.raises(ValueError, match="^code: value 200"):
        stdet_kernels.reconstruct(**args)
    code[0] = stdet_kernels.DUMMY
    stdet_kernels.reconstruct(**args)
    with pytest.raises(ValueError, match="^code: value 2 names mode 2, but refs has 2 modes"):
        stdet_kernels.reconstruct(
            **{**args, "code": torch.full((8,), 2, dtype=torch.uint8), "refs": torch.zeros(2)}
        )


@pytest.mark.parametrize(
    ("alpha", "error"),
    [
        (0.0, ValueError),
        (-0.1, ValueError),
        (1.5, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (torch.tensor(0.1), TypeError),
    ],
)
def test_alpha_must_be_a_finite_number_in_the_unit_interval(alpha, error: type) -> None:
    args = _args()
    with pytest.raises(error, match="^alpha: "):
        stdet_kernels.reconstruct_sma_(**args, sma=torch.zeros(8), alpha=alpha)
    with pytest.raises(error, match="^alpha: "):
        stdet_kernels.lerp_([torch.zeros(2)], [torch.ones(2)], alpha)


@pytest.mark.parametrize(
    "sma",
    [torch.zeros(9), torch.zeros(8, dtype=torch.float16), torch.zeros(2, 4), torch.zeros(8, device="meta")],
)
def test_sma_must_match_value(sma: torch.Tensor) -> None:
    with pytest.raises((ValueError, TypeError), match="^sma: "):
        stdet_kernels.reconstruct_sma_(**_args(), sma=sma, alpha=0.5)


def test_lerp_rejects_bad_lists() -> None:
    with pytest.raises(TypeError, match="^averages: "):
        stdet_kernels.lerp_(torch.zeros(2), [torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match="^samples: expected 2 tensors"):
        stdet_kernels.lerp_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match=r"^samples\[1\]: expected shape \(3,\)"):
        stdet_kernels.lerp_([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)], 0.5)
    with pytest.raises(TypeError, match=r"^samples\[0\]: expected dtype"):
        stdet_kernels.lerp_([torch.zeros(2)], [torch.zeros(2, dtype=torch.float16)], 0.5)
    with pytest.raises(TypeError, match=r"^averages\[0\]: expected dtype"):
        stdet_kernels.lerp_([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], 0.5)
    with pytest.raises(TypeError, match=r"^samples\[0\]: expected a torch.Tensor"):
        stdet_kernels.lerp_([torch.zeros(2)], [None], 0.5)
