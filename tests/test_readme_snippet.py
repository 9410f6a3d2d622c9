"""The README's first ```python block runs as written: on CPU, with tiny random tensors, and its loss backpropagates."""

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    match = re.search(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_snippet_runs_and_backpropagates():
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)
    loss = namespace.get("loss")
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, "the snippet should compute a scalar `loss`"
    assert math.isfinite(loss.item())
    leaves = [t for t in namespace.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]
    modules = [m for m in namespace.values() if isinstance(m, torch.nn.Module)]
    leaves += [p for m in modules for p in m.parameters() if p.requires_grad]
    assert leaves, "the snippet should have trainable tensors"
    for t in leaves:
        assert t.grad is not None, "loss.backward() left a trainable tensor without a gradient"
        assert torch.isfinite(t.grad).all()
    assert any(t.grad.abs().sum() > 0 for t in leaves)
    logps = namespace.get("logps")
    if logps is not None:
        assert torch.isfinite(logps).all() and (logps <= 0).all()
