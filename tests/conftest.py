import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests skip without CUDA; interpret tests skip unless TRITON_INTERPRET=1 was set before import."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    no_interp = pytest.mark.skip(reason="run with TRITON_INTERPRET=1 (make test does)")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "interpret" in item.keywords and not interpret:
            item.add_marker(no_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP threads spinning against a busy 2-core box cost 10× the work).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
