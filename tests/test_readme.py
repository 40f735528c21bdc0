"""The README's example runs and shows what it says."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_its_comments_hold() -> None:
    (example,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert torch.equal(namespace["value"].grad, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(namespace["refs"].grad, torch.tensor([2.0, -1.0]))
    assert torch.equal(namespace["w"], torch.tensor([0.0, 7.0, 9.0, 1.0]))
    assert torch.allclose(namespace["sma"], 0.1 * torch.tensor([0.0, 7.0, 9.0, 1.0]))
    assert all(torch.allclose(t, torch.full_like(t, 0.1)) for t in namespace["averages"])
