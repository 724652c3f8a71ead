import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, gendistill's own Triton kernels run in Triton's interpreter (on CPU tensors) against their references.
# Set before any gendistill kernel module is imported (Triton reads it when a kernel is defined); importing torch
# defines none.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The GPU suite runs as `gendistill distill` does: the shipped fla configs where they fit this GPU (fuzzy keys, so
    # the tests' small shapes run the configs tuned on the 0.6B shape, against their references, and skip most of fla's
    # autotuning, minutes on a fresh machine); set before fla is first imported.
    from gendistill.kernels.cache import configure_for_cuda  # noqa: E402

    configure_for_cuda()

# Tiny models: one thread avoids OpenMP spin contention (measured 10x faster on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run on a CUDA machine (`pytest -m gpu`); elsewhere they are reported as skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: needs CUDA (run `pytest -m gpu` on the GPU machine, bench/gpu.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
