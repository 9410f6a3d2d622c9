import pytest

import hermesflow_fast.ops.logprobs as logprobs


@pytest.fixture
def logits_rows(monkeypatch):
    """Rows of every block of logits the ops build (forward, reference and backward), in call order."""
    seen: list[int] = []
    real = logprobs.chunk_logits

    def spy(x, w, b, buf=None):
        z = real(x, w, b, buf)
        seen.append(z.shape[0])
        return z

    monkeypatch.setattr(logprobs, "chunk_logits", spy)
    return seen
