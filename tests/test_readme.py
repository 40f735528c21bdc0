"""The README's example runs and shows what it says."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_op_example_runs_and_its_comments_hold() -> None:
    namespace: dict = {}
    exec(compile(_examples()[0], str(README), "exec"), namespace)
    assert torch.equal(namespace["value"].grad, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(namespace["refs"].grad, torch.tensor([2.0, -1.0]))
    assert torch.equal(namespace["w"], torch.tensor([0.0, 7.0, 9.0, 1.0]))
    assert torch.allclose(namespace["sma"], 0.1 * torch.tensor([0.0, 7.0, 9.0, 1.0]))
    assert all(torch.allclose(t, torch.full_like(t, 0.1)) for t in namespace["averages"])


def test_readme_training_loop_example_runs() -> None:
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(_examples()[1], str(README), "exec"), namespace)
    assert namespace["st"].phase == "embedding"
    assert namespace["st"].trainable_fraction() < 1.0
    assert "g_a.0.weight" in namespace["plain"]
