"""Chat templates: jinja rendering matches transformers, built-ins follow XTuner, segments mark replies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tunex.errors import DataError
from tunex.templates import get_template, names

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# exercises the sandbox extras transformers provides: tojson, raise_exception, namespace, loop controls
FANCY = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ raise_exception('no tools') }}{% endif %}{% set ns.n = ns.n + 1 %}"
    "[{{ ns.n }}]{{ m | tojson }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}>>> {% endif %}"
)

CONVS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2? «ünïcode» 你好"},
        {"role": "assistant", "content": " 4 "},
    ],
]


def fake_tokenizer(template: str | None, bos="<s>", eos="</s>"):
    return SimpleNamespace(
        chat_template=template,
        bos_token=bos,
        eos_token=eos,
        special_tokens_map={"bos_token": bos, "eos_token": eos},
        path="fake",
    )


@pytest.mark.parametrize("source", [CHATML, LLAMA3, FANCY], ids=["chatml", "llama3", "fancy"])
@pytest.mark.parametrize("conv", CONVS, ids=["one", "multi"])
@pytest.mark.parametrize("gen", [True, False])
def test_jinja_render_matches_transformers(source, conv, gen):
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = fake_tokenizer(source, bos="<|begin_of_text|>", eos="<|eot_id|>")
    expected = render_jinja_template(
        [conv], chat_template=source, add_generation_prompt=gen, bos_token=tok.bos_token, eos_token=tok.eos_token
    )[0][0]
    assert get_template("auto", tok).render(conv, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("source", [CHATML, LLAMA3, FANCY], ids=["chatml", "llama3", "fancy"])
def test_jinja_segments_mark_replies_and_end_of_turn(source):
    tok = fake_tokenizer(source, bos="<|begin_of_text|>", eos="<|eot_id|>")
    tpl = get_template("auto", tok)
    conv = CONVS[1]
    segs = tpl.segments(conv)
    assert "".join(s.text for s in segs) == tpl.render(conv, add_generation_prompt=False)
    targets = [s.text for s in segs if s.is_target]
    assert len(targets) == 2
    assert targets[0].startswith("Hello! How can I help?")
    assert targets[0].endswith(("<|im_end|>", "<|eot_id|>"))
    assert "user" not in "".join(targets)


def test_sandbox_blocks_attribute_escape():
    tok = fake_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception) as info:
        get_template("auto", tok).render(CONVS[0])
    assert "unsafe" in str(info.value).lower() or "security" in type(info.value).__name__.lower()


def test_builtin_internlm2_follows_xtuner():
    tpl = get_template("internlm2_chat", fake_tokenizer(None, bos="<s>", eos="</s>"))
    segs = tpl.segments(CONVS[1])
    assert [s.is_target for s in segs] == [False, True, False, True, False]
    assert segs[0].text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert segs[1].text == "Hello! How can I help?<|im_end|>"  # suffix is the eos: no </s>
    assert tpl.stop_words == ["<|im_end|>", "</s>"]


def test_builtin_default_appends_eos_and_restarts_with_bos():
    tpl = get_template("default", fake_tokenizer(None), system="SYS")
    segs = tpl.segments(
        CONVS[0]
        + [
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"},
        ]
    )
    assert segs[0].text == "<s><|System|>:SYS\n<|User|>:Hi there\n<|Bot|>:"
    assert segs[1] == type(segs[1])("yo</s>", True)
    assert segs[2].text == "\n<s><|User|>:again\n<|Bot|>:"
    assert tpl.render(CONVS[0]) == segs[0].text


def test_alpaca_has_its_default_system_prompt():
    text = get_template("alpaca").render(CONVS[0])
    assert text.startswith("Below is an instruction that describes a task.")
    assert text.endswith("### Instruction:\nHi there\n\n### Response:\n")


def test_every_builtin_renders_and_segments():
    for name in names():
        tpl = get_template(name, fake_tokenizer(None))
        segs = tpl.segments(CONVS[1])
        assert "".join(s.text for s in segs) == tpl.render(CONVS[1])
        assert sum(s.is_target for s in segs) == 2, name


def test_errors_name_the_problem():
    with pytest.raises(DataError, match="unknown chat template 'nope'.*qwen_chat"):
        get_template("nope")
    with pytest.raises(DataError, match="no chat template"):
        get_template("auto", fake_tokenizer(None))
    with pytest.raises(DataError, match="role 'robot'"):
        get_template("chatml").render([{"role": "robot", "content": "x"}])
    with pytest.raises(DataError, match="does not parse"):
        get_template("auto", fake_tokenizer("{% for %}")).render(CONVS[0])
