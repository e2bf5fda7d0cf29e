import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes (a test-time reference only) logs a warning about an optional CPU kernel package.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_switches():
    """Each test starts and ends with qlora.settings read from the environment as it is then (a test
    that sets a QLORA_* variable through ``switch`` leaves nothing behind)."""
    from qlora import settings
    settings.refresh()
    yield
    settings.refresh()


@pytest.fixture
def switch(monkeypatch):
    """``switch("QLORA_X", "0")`` sets a QLORA_* variable for this test and re-reads qlora.settings;
    ``switch("QLORA_X", None)`` unsets it."""
    from qlora import settings

    def set_(name: str, value: str | None):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        settings.refresh()
    return set_


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The training tests' folder: a tiny model and a data file (helpers.make_train_dir)."""
    from helpers import make_train_dir
    return make_train_dir(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    """An adapter with non-zero B on q_proj and down_proj of the module's ``tiny`` model (its first
    item: the model directory), saved in the PEFT format."""
    from helpers import save_random_adapter
    return save_random_adapter(tiny[0], tmp_path_factory.mktemp("ad") / "adapter", seed=1)
