"""Ollama Modelfiles for tunex's GGUF exports: ``FROM``, the chat template as an Ollama (Go
text/template) ``TEMPLATE``, a ``PARAMETER stop`` per end-of-turn word, and the default system prompt.

The Go template is derived from the model's own chat template (tunex.templates, the jinja one or a
built-in), not translated from its source: conversations whose contents are unique markers are
rendered, and the text around the markers gives the fixed pieces of each turn. That holds for
templates whose turns are fixed text around the content (ChatML, Llama 3, SmolLM2, Qwen, Mistral
...); one that formats turns in other ways (numbering them, changing earlier turns as later ones come)
is refused with an error rather than written wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunex.errors import DataError

# marker contents: plain words no template rewrites (no whitespace to trim, no case to change)
_S, _U1, _A1, _U2 = "TUNEXSYSTEM7f3a", "TUNEXUSER1b6c", "TUNEXASSISTANT4d2e", "TUNEXUSER2c9b"


@dataclass(frozen=True)
class TurnPieces:
    """The fixed text of a chat format: a conversation renders as ``head`` (``system_head`` +
    system + ``system_close`` with a system message, else ``plain_head``), then per user turn
    ``user_open`` + content + ``user_close``, per assistant turn ``assistant_open`` + content +
    ``assistant_close``, and ``assistant_open`` again to start the reply."""

    system_head: str
    system_close: str
    plain_head: str
    user_open: str
    user_close: str
    assistant_open: str
    assistant_close: str

    def default_system(self) -> str | None:
        """The system prompt the template uses when a conversation has none (None: no system turn)."""
        h, c = self.system_head, self.system_close
        if len(self.plain_head) > len(h) + len(c) and self.plain_head.startswith(h) and self.plain_head.endswith(c):
            return self.plain_head[len(h) : len(self.plain_head) - len(c)]
        return None


def _split(text: str, markers: Sequence[str], what: str) -> list[str]:
    pieces, rest = [], text
    for m in markers:
        before, found, rest = rest.partition(m)
        if not found or m in rest:
            raise DataError(f"{what}: the chat template does not place each message's content once, as it is")
        pieces.append(before)
    return [*pieces, rest]


def _common_suffix(texts: Sequence[str]) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - n - 1] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n :] if n else ""


def _after_end_of_turn(text: str, words: Sequence[str]) -> int:
    """Where ``text`` continues after its first end-of-turn word and the newlines after it (0: none)."""
    found = [(at, w) for w in words if (at := text.find(w)) >= 0]
    if not found:
        return 0
    at, word = min(found)
    cut = at + len(word)
    while cut < len(text) and text[cut] == "\n":
        cut += 1
    return cut


def turn_pieces(template) -> TurnPieces:
    """The fixed pieces of ``template`` (a :class:`tunex.templates.ChatTemplate`), checked by
    rendering conversations of every shape the Go template covers."""

    def msg(role, content):
        return {"role": role, "content": content}

    full = template.render(
        [msg("system", _S), msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], add_generation_prompt=True
    )
    system_head, sys_to_user, user_to_asst, asst_to_user, end = _split(full, (_S, _U1, _A1, _U2), "system+3 turns")
    plain = template.render([msg("user", _U1)], add_generation_prompt=True)
    plain_head, plain_end = _split(plain, (_U1,), "one user turn")
    if plain_end != user_to_asst or end != user_to_asst:
        raise DataError("the chat template's reply cue differs between turns; an Ollama template cannot follow it")
    # the text between turns is one turn's close and the next one's open: split it after the
    # end-of-turn word (and its newlines) where there is one
    user_open = _common_suffix([sys_to_user, asst_to_user])
    user_open = user_open[_after_end_of_turn(user_open, template.stop_words) :]
    if not plain_head.endswith(user_open):
        user_open = _common_suffix([sys_to_user, asst_to_user, plain_head])
    cut = _after_end_of_turn(user_to_asst, template.stop_words)
    pieces = TurnPieces(
        system_head=system_head,
        system_close=sys_to_user[: len(sys_to_user) - len(user_open)],
        plain_head=plain_head[: len(plain_head) - len(user_open)],
        user_open=user_open,
        user_close=user_to_asst[:cut],
        assistant_open=user_to_asst[cut:],
        assistant_close=asst_to_user[: len(asst_to_user) - len(user_open)],
    )
    for text in vars(pieces).values():
        if "{{" in text or "}}" in text or '"""' in text:
            raise DataError(
                f"the chat template's text {text!r} holds '{{{{', '}}}}' or '\"\"\"', which a Modelfile cannot quote"
            )
    return pieces


def go_template(p: TurnPieces) -> str:
    """The Ollama TEMPLATE (Go text/template over ``.System`` and ``.Messages``) of the pieces.

    Written without ``{{-`` trim markers: the pieces' own newlines are part of the format."""
    return (
        f"{{{{ if .System }}}}{p.system_head}{{{{ .System }}}}{p.system_close}{{{{ else }}}}{p.plain_head}{{{{ end }}}}"
        f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{p.user_open}{{{{ .Content }}}}{p.user_close}'
        f'{{{{ else if eq .Role "assistant" }}}}{p.assistant_open}{{{{ .Content }}}}{p.assistant_close}'
        f"{{{{ end }}}}{{{{ end }}}}{p.assistant_open}"
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(gguf_path: str | Path, template, where: str | Path) -> str:
    """The Modelfile text for ``gguf_path``, to be saved at ``where`` (``FROM`` is relative to it)."""
    pieces = turn_pieces(template)
    source = os.path.relpath(Path(gguf_path).resolve(), Path(where).resolve().parent)
    lines = [f"FROM ./{source}" if not os.path.isabs(source) else f"FROM {source}"]
    lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    system = pieces.default_system()
    if system is not None:
        if '"""' in system:
            raise DataError('the default system prompt holds \'"""\', which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    for word in template.stop_words:
        lines.append(f"PARAMETER stop {_quote(word)}")
    return "\n".join(lines) + "\n"


def modelfile_of(model_dir: str | Path, gguf_path: str | Path, where: str | Path) -> str:
    """The Modelfile for ``gguf_path`` exported from ``model_dir`` (whose tokenizer holds the chat
    template), to be saved at ``where``."""
    from tunex.models.hub import resolve_model_path
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    return modelfile(gguf_path, get_template("auto", load_tokenizer(resolve_model_path(model_dir))), where)


def write_text(out: str | Path, text: str) -> Path:
    """Write ``text`` to ``out`` in one step (never a partial file under its name)."""
    from tunex.io.atomic import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text)
    return out
