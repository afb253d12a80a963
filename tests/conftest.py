import pytest
import torch


def pytest_collection_modifyitems(config, items):
    "Tests marked `cuda` are skipped on machines without a GPU."
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def threads():
    "Set torch's intra-op thread count for one test (the CPU kernel picks its parallel strategy from it)."
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
