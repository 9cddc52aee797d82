"""Chat templates: render a conversation to text, and split it into target / non-target segments.

Two kinds of template share one interface (:class:`ChatTemplate`):

* **built-in** templates named like XTuner's (``default``, ``alpaca``, ``internlm2_chat``,
  ``llama3_chat``, ``qwen_chat`` = ``chatml``, ``mistral``, ``llama2_chat``, ``zephyr`` ...), each a
  handful of format strings (system / instruction / suffix / separator) plus stop words;
* the model's **own jinja template** (``chat_template`` of tokenizer_config.json or
  chat_template.jinja), rendered in a sandbox exactly as transformers' ``apply_chat_template`` does.

Get one with :func:`get_template` (``"auto"`` = the model's own, else a built-in name).

Conversations are lists of OpenAI-style messages ``{"role": "system"|"user"|"assistant",
"content": str}``.

API for label masking (the data pipeline builds on it)::

    tpl = get_template("auto", tokenizer)        # or get_template("qwen_chat", tokenizer)
    for seg in tpl.segments(messages):           # list[Segment(text, is_target)]
        ids = tokenizer.encode(seg.text, add_special_tokens=False)
        labels += ids if seg.is_target else [-100] * len(ids)

``segments`` concatenates to the full rendered conversation (``render(messages,
add_generation_prompt=False)``). Target segments are exactly each assistant reply plus the token
that ends its turn (the template's suffix such as ``<|im_end|>``, or the tokenizer's eos token for
templates without one), so a model trained on them learns to stop. BOS is part of the first
non-target segment when the template (or, for built-ins, ``bos_token``) adds it. Special tokens
appear as their text; encoding each segment with ``add_special_tokens=False`` maps them to their ids.

For jinja templates the split is found by rendering prefixes of the conversation: the text that
the assistant message adds after ``render(messages[:i], add_generation_prompt=True)`` holds the
reply; the target runs from the reply to the first end-of-turn marker after it. Templates that
rewrite earlier turns when later ones are added (not prefix-stable) raise :class:`DataError`.

For generation: ``render(messages, add_generation_prompt=True)`` is the prompt and
``stop_words`` the strings that end a reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tunex.errors import DataError

Message = Mapping[str, Any]

# End-of-turn markers of the common chat formats; used to find where a jinja-rendered reply ends.
END_OF_TURN_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eoa>",
)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation; ``is_target`` marks text the model is trained to produce."""

    text: str
    is_target: bool


@dataclass(frozen=True)
class BuiltinTemplate:
    """An XTuner-style prompt template: format strings with ``{system}`` / ``{input}`` slots.

    ``suffix`` closes every assistant reply; when ``suffix_as_eos`` is false the tokenizer's eos
    token follows the reply as well (a target too). ``sep`` separates turns (never a target).
    """

    name: str
    system: str
    instruction: str
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = ()
    default_system: str = ""


_IM = "<|im_start|>{role}\n{text}<|im_end|>\n"
_CHATML = dict(
    system=_IM.format(role="system", text="{system}"),
    instruction=_IM.format(role="user", text="{input}") + "<|im_start|>assistant\n",
    suffix="<|im_end|>",
    suffix_as_eos=True,
    sep="\n",
)
_LLAMA2_SYS = (
    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as "
    "helpfully as possible, while being safe. Your answers should not include any harmful, "
    "unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your "
    "responses are socially unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] "
)
_VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. {system}\n "
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
)

BUILTIN: dict[str, BuiltinTemplate] = {
    t.name: t
    for t in [
        BuiltinTemplate("default", "<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", sep="\n"),
        BuiltinTemplate(
            "alpaca",
            "{system}\n",
            "### Instruction:\n{input}\n\n### Response:\n",
            sep="\n\n",
            default_system=ALPACA_SYSTEM,
        ),
        BuiltinTemplate("zephyr", "<|system|>\n{system}\n", "<|user|>\n{input}\n<|assistant|>\n", sep="\n"),
        BuiltinTemplate(
            "internlm_chat",
            "<|System|>:{system}\n",
            "<|User|>:{input}<eoh>\n<|Bot|>:",
            suffix="<eoa>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<eoa>",),
        ),
        BuiltinTemplate("internlm2_chat", **_CHATML, stop_words=("<|im_end|>",)),
        BuiltinTemplate("qwen_chat", **_CHATML, stop_words=("<|im_end|>", "<|endoftext|>")),
        BuiltinTemplate("chatml", **_CHATML, stop_words=("<|im_end|>",)),
        BuiltinTemplate("llama2_chat", _LLAMA2_SYS, "[INST] {input} [/INST]", sep="\n"),
        BuiltinTemplate("code_llama_chat", "{system}\n", "[INST] {input} [/INST]"),
        BuiltinTemplate("mistral", "[INST] {system} [/INST]\n", "[INST] {input} [/INST]", sep="\n"),
        BuiltinTemplate("mixtral", "[INST] {system} [/INST]\n", "[INST] {input} [/INST]", sep="\n"),
        BuiltinTemplate("vicuna", _VICUNA_SYS, "USER: {input} ASSISTANT:", sep="\n"),
        BuiltinTemplate(
            "llama3_chat",
            "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>",),
        ),
        BuiltinTemplate(
            "gemma",
            "<start_of_turn>system\n{system}<end_of_turn>\n",
            "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
            suffix="<end_of_turn>",
            sep="\n",
            stop_words=("<end_of_turn>",),
        ),
        BuiltinTemplate(
            "phi3_chat",
            "<|system|>\n{system}<|end|>\n",
            "<|user|>\n{input}<|end|>\n<|assistant|>\n",
            suffix="<|end|>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<|end|>",),
        ),
    ]
}


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    rest = list(messages)
    if rest and rest[0].get("role") == "system":
        return str(rest[0].get("content") or ""), rest[1:]
    return None, rest


def _check_messages(messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise DataError(f"message {i} is not a {{'role': ..., 'content': ...}} mapping: {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"message {i} has role {m['role']!r}; expected 'system', 'user' or 'assistant'")
        if m["role"] == "system" and i != 0:
            raise DataError(f"message {i} is a system message; only the first message may be one")


@dataclass
class ChatTemplate:
    """A chat format bound to a tokenizer's special tokens. Build it with :func:`get_template`."""

    name: str
    builtin: BuiltinTemplate | None = None
    jinja_source: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    default_system: str = ""
    _compiled: Any = field(default=None, repr=False)

    # ---- public API -----------------------------------------------------------------------------

    @property
    def stop_words(self) -> list[str]:
        """Strings that end a generated reply (the eos token included)."""
        if self.builtin is not None:
            words = list(self.builtin.stop_words)
        else:
            words = [m for m in END_OF_TURN_MARKERS if m in (self.jinja_source or "")]
        if self.eos_token and self.eos_token not in words:
            words.append(self.eos_token)
        return words

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as text; with ``add_generation_prompt`` ready for the assistant's reply."""
        _check_messages(messages)
        if self.builtin is not None:
            # a user turn's instruction already ends with the assistant's cue
            return "".join(s.text for s in self._builtin_segments(messages))
        return self._render_jinja(messages, add_generation_prompt)

    def segments(self, messages: Sequence[Message]) -> list[Segment]:
        """The conversation as (text, is_target) pieces; see the module docstring."""
        _check_messages(messages)
        if self.builtin is not None:
            return _merge(self._builtin_segments(messages))
        return _merge(self._jinja_segments(messages))

    # ---- built-in templates ---------------------------------------------------------------------

    def _builtin_segments(self, messages: Sequence[Message]) -> list[Segment]:
        t = self.builtin
        assert t is not None
        system, rest = _split_system(messages)
        if system is None:
            system = self.default_system or t.default_system
        out: list[Segment] = []
        # XTuner starts every conversation with bos, unless the format itself opens with that token
        # (ChatML tokenizers whose bos is <|im_start|>)
        if self.bos_token and not (t.system + t.instruction).startswith(self.bos_token):
            out.append(Segment(self.bos_token, False))
        pending_system = system
        for i, m in enumerate(rest):
            content = str(m.get("content") or "")
            if m["role"] == "user":
                head = t.system.format(system=pending_system) if pending_system else ""
                pending_system = ""
                out.append(Segment(head + t.instruction.format(input=content, round=i // 2 + 1), False))
            else:
                reply = content + t.suffix
                if not t.suffix_as_eos and self.eos_token:
                    reply += self.eos_token
                out.append(Segment(reply, True))
                if t.sep:
                    out.append(Segment(t.sep, False))
                if not t.suffix_as_eos and self.bos_token and i + 1 < len(rest):
                    out.append(Segment(self.bos_token, False))
        return out

    # ---- jinja templates ------------------------------------------------------------------------

    def _render_jinja(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        import jinja2

        if self._compiled is None:
            self._compiled = compile_jinja(self.jinja_source or "")
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise DataError(f"chat template {self.name!r} failed to render: {exc}") from exc

    def _jinja_segments(self, messages: Sequence[Message]) -> list[Segment]:
        out: list[Segment] = []
        done = ""  # rendered text already emitted; always a prefix of later renders
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render_jinja(messages[:i], True) if i else ""
            after = self._render_jinja(messages[: i + 1], False)
            if i and not after.startswith(before):
                # the generation cue differs from how a finished turn opens: diff from the plain prefix
                before = self._render_jinja(messages[:i], False)
            if not before.startswith(done) or not after.startswith(before):
                raise DataError(
                    f"chat template {self.name!r} is not prefix-stable (rendering turn {i} changes the text "
                    "of earlier turns), so assistant replies cannot be located; use a built-in template "
                    "(data.template = 'chatml', 'llama3_chat', ...) instead"
                )
            out.append(Segment(before[len(done) :], False))
            added = after[len(before) :]
            start, end = _locate_reply(added, str(m.get("content") or ""), self.stop_words)
            out += [Segment(added[:start], False), Segment(added[start:end], True), Segment(added[end:], False)]
            done = after
        full = self._render_jinja(messages, False)
        if not full.startswith(done):
            raise DataError(f"chat template {self.name!r} is not prefix-stable; use a built-in template")
        out.append(Segment(full[len(done) :], False))
        return out


def _locate_reply(added: str, content: str, markers: Sequence[str]) -> tuple[int, int]:
    """Where the reply (plus its end-of-turn marker) sits inside the text an assistant turn added."""
    probe = content
    start = added.find(probe) if probe else -1
    if start < 0:  # templates that trim the content (llama3's does)
        probe = content.strip()
        start = added.find(probe) if probe else -1
    if start < 0:
        return 0, len(added)  # the template rewrote the content: train on all the turn added
    tail = start + len(probe)
    ends = [added.find(m, tail) + len(m) for m in markers if m and added.find(m, tail) >= 0]
    return start, (min(ends) if ends else len(added))


def _merge(segments: list[Segment]) -> list[Segment]:
    """Drop empty pieces and join neighbours of the same kind."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].is_target == s.is_target:
            out[-1] = Segment(out[-1].text + s.text, s.is_target)
        else:
            out.append(s)
    return out


def compile_jinja(source: str):
    """Compile a chat template the way transformers does (sandboxed, same filters and globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' own
        # masking; here it renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from exc


def names() -> list[str]:
    """Names accepted by :func:`get_template` besides ``auto``."""
    return sorted(BUILTIN)


def get_template(name: str = "auto", tokenizer: Any = None, *, system: str = "") -> ChatTemplate:
    """The chat template ``name`` bound to ``tokenizer``'s special tokens.

    Args:
        name: ``"auto"`` for the model's own jinja template (from ``tokenizer.chat_template``), or a
            built-in name (see :func:`names`).
        tokenizer: a :class:`tunex.tokenizer.Tokenizer` (or anything with ``bos_token``,
            ``eos_token``, ``special_tokens_map`` and ``chat_template``); optional for built-ins.
        system: a system prompt used when a conversation has none (built-ins only; a jinja
            template has its own default, pass a system message instead).
    """
    bos = getattr(tokenizer, "bos_token", None)
    eos = getattr(tokenizer, "eos_token", None)
    specials = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    if name == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            where = getattr(tokenizer, "path", "the tokenizer")
            raise DataError(
                f"{where} has no chat template (tokenizer_config.json 'chat_template' or "
                f"chat_template.jinja); name a built-in template instead: {', '.join(names())}"
            )
        return ChatTemplate("auto", jinja_source=source, bos_token=bos, eos_token=eos, special_tokens=specials)
    if name not in BUILTIN:
        raise DataError(f"unknown chat template {name!r}; expected 'auto' or one of: {', '.join(names())}")
    t = BUILTIN[name]
    # XTuner adds the bos token before each conversation for built-ins whose eos is the tokenizer's
    return ChatTemplate(name, builtin=t, bos_token=bos, eos_token=eos, special_tokens=specials, default_system=system)
