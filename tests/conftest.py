import importlib.util
import os

import pytest
import torch

from tests.factories.dit import make_tiny_diffusers_dit, save_comfy_dit
from tests.factories.qwen3 import cached_tokenizer

# Tiny models gain nothing from intra-op threads, and the suite runs servers and workers in
# subprocesses beside itself: on a 2-core machine two OpenMP pools per process spin against each
# other (a 0.2 s encoder stage took 10 s under load). One thread, unless the caller chose.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if importlib.util.find_spec("ray") is None:
        skips["ray"] = pytest.mark.skip(reason="needs the ray extra: pip install -e '.[ray]'")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The built-in Qwen tokenizer, built once per test session."""
    return cached_tokenizer(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def dit_model():
    """A tiny random diffusers ZImageTransformer2DModel."""
    return make_tiny_diffusers_dit()


@pytest.fixture(scope="module")
def dit_bf16(dit_model, tmp_path_factory):
    """``dit_model`` as a ComfyUI bf16 single file."""
    return save_comfy_dit(dit_model, tmp_path_factory.mktemp("src") / "dit_bf16.safetensors")
