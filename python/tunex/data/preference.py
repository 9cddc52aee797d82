"""Preference pairs: records of (prompt, chosen, rejected) -> two samples per pair in the token store.

Record forms of ``data.format = "preference"`` (one JSON object per line):

- TRL's standard form: ``{"prompt": str, "chosen": str, "rejected": str}``; the prompt becomes a user
  turn and each response an assistant turn.
- TRL's conversational form, which is also XTuner's DPO record: ``prompt`` a list of chat messages
  (system, user and earlier assistant turns), ``chosen`` and ``rejected`` lists of messages (usually
  one assistant turn each). When both lists start with the prompt's messages again (UltraFeedback
  and orpo-dpo-mix-40k repeat the prompt inside each side), that repeated start is taken off.
- Either form without ``prompt`` (TRL's implicit prompt): the shared beginning of ``chosen`` and
  ``rejected`` is the prompt (whole messages for lists; for strings, up to the last whitespace
  before they differ, as a user turn).

``data.format = "chatterbot_pairs"`` turns chatterbot-corpus conversations into pairs by one rule:
the conversation up to its last question is the prompt, the corpus's answer is chosen, and the
question repeated back is rejected (an answer is preferred to echoing the question).

Both sides are rendered with the chat template (the prompt's turns are never targets; the
responses' assistant turns are) and tokenized whole. Truncation, per pair, so that each side fits
``max_length`` tokens: first the prompt loses tokens from its start, down to ``max_length // 2``
tokens (or its whole length if shorter); then each response that still does not fit is cut at the
end. A pair cut either way counts once as ``truncated``; a pair left without a target on either
side is dropped and counted. The store keeps side by side the chosen sample (2k) and the rejected
one (2k+1) of pair k; identical chosen and rejected responses are kept and counted
(``identical_pairs``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunex.data.encode import Encoded, Encoder, Prepared
from tunex.data.formats import (
    Conversation,
    Message,
    RecordError,
    _kind,
    fields_present,
    role_and_content,
    with_system,
)

PAIR_VERSION = "2"  # bump when the encoded pairs of the same inputs change


@dataclass(frozen=True, slots=True)
class Pair:
    """One preference record: a shared prompt and two responses (assistant turns are targets)."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation

    def sides(self) -> tuple[Conversation, Conversation]:
        return (*self.prompt, *self.chosen), (*self.prompt, *self.rejected)


def _messages(value: Any, name: str, *, response: bool) -> Conversation:
    if not isinstance(value, list):
        raise RecordError(f"field {name!r}: expected a string or a list of messages, got {_kind(value)}")
    out = []
    for i, m in enumerate(value):
        role, content = role_and_content(m, f"{name}[{i}]")
        out.append(Message(role, content, response and role == "assistant"))
    return tuple(out)


def _required(record: dict, name: str) -> Any:
    if record.get(name) is None:
        raise RecordError(f"missing field {name!r} (fields present: {fields_present(record)})")
    return record[name]


def pair(record: Any) -> Pair:
    """The ``preference`` format's mapper (see the module docstring for the forms)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with 'chosen' and 'rejected', got {_kind(record)}")
    chosen, rejected = _required(record, "chosen"), _required(record, "rejected")
    prompt = record.get("prompt")
    strings = isinstance(chosen, str)
    if strings != isinstance(rejected, str):
        raise RecordError(
            f"fields 'chosen' and 'rejected': expected both strings or both lists of messages, got "
            f"{_kind(chosen)} and {_kind(rejected)}"
        )
    if prompt is None:
        return _implicit(chosen, rejected) if strings else _implicit_messages(chosen, rejected)
    if isinstance(prompt, str):
        turns: Conversation = (Message("user", prompt),)
    else:
        turns = _messages(prompt, "prompt", response=False)
    if strings:
        return Pair(turns, (Message("assistant", chosen, True),), (Message("assistant", rejected, True),))
    c, r = _messages(chosen, "chosen", response=True), _messages(rejected, "rejected", response=True)
    n = len(turns)
    if min(len(c), len(r)) > n and _same(c[:n], turns) and _same(r[:n], turns):
        c, r = c[n:], r[n:]  # the sides hold the whole conversation, the prompt again first (UltraFeedback's form)
    return Pair(turns, c, r)


def _same(a: Conversation, b: Conversation) -> bool:
    return [(m.role, m.content) for m in a] == [(m.role, m.content) for m in b]


def _implicit(chosen: str, rejected: str) -> Pair:
    same = 0
    while same < min(len(chosen), len(rejected)) and chosen[same] == rejected[same]:
        same += 1
    cut = max((i + 1 for i in range(same) if chosen[i].isspace()), default=0)  # back to a word boundary
    prompt = chosen[:cut].rstrip()
    turns = (Message("user", prompt),) if prompt else ()
    return Pair(turns, (Message("assistant", chosen[cut:], True),), (Message("assistant", rejected[cut:], True),))


def _implicit_messages(chosen: Any, rejected: Any) -> Pair:
    c = _messages(chosen, "chosen", response=True)
    r = _messages(rejected, "rejected", response=True)
    shared = 0
    while shared < min(len(c), len(r)) - 1 and (c[shared].role, c[shared].content) == (
        r[shared].role,
        r[shared].content,
    ):
        shared += 1
    prompt = tuple(Message(m.role, m.content) for m in c[:shared])  # the prompt trains nothing
    return Pair(prompt, c[shared:], r[shared:])


def chatterbot_pair(record: Any) -> Pair:
    """chatterbot-corpus ``[q, a, q, a, ...]`` -> prompt up to the last question, chosen = its answer,
    rejected = the question repeated back."""
    if isinstance(record, str):
        record = [record]
    if not isinstance(record, list) or not all(isinstance(x, str) for x in record):
        raise RecordError(f"expected a list of strings (question, answer, ...), got {_kind(record)}")
    usable = record[: len(record) - len(record) % 2]
    if not usable:  # a question without an answer: a pair without targets, dropped and counted
        return Pair((), (), ())
    earlier = tuple(Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(usable[:-2]))
    question, answer = usable[-2], usable[-1]
    return Pair(
        (*earlier, Message("user", question)),
        (Message("assistant", answer, True),),
        (Message("assistant", question, True),),
    )


# ---- encoding --------------------------------------------------------------------------------------


@dataclass
class _Pairs(Prepared):
    identical: int = 0


class PairEncoder(Encoder):
    """Encodes :class:`Pair` samples into two store samples each (chosen, then rejected)."""

    def prepare(self, samples) -> Prepared:
        if self.renderer is None:
            raise ValueError("preference pairs need a chat template; pass template=")
        texts, all_spans, prefixes = [], [], []
        dropped = identical = 0
        for p in samples:
            rendered = []
            for side in p.sides():
                conv = with_system(side, self.system)
                text, spans, prefix = self.renderer.render(conv) if any(m.loss for m in conv) else ("", [], 0)
                rendered.append((text, spans, prefix))
            if not rendered[0][1] or not rendered[1][1]:
                dropped += 1
                continue
            identical += rendered[0][0] == rendered[1][0]
            for text, spans, prefix in rendered:
                texts.append(text)
                all_spans.append(spans)
                prefixes.append(prefix)
        return _Pairs(texts, all_spans, dropped, prefixes, identical)

    def tokenize(self, prepared: Prepared) -> Encoded:
        ids_out: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        lengths: list[int] = []
        dropped, truncated = prepared.dropped, 0
        sides = self._tokenized(prepared.texts, prepared.spans, prepared.prefixes or [0] * len(prepared.texts))
        for chosen, rejected in _two_by_two(sides):
            fitted, cut = fit_pair(chosen, rejected, self.max_length)
            if fitted is None:
                dropped += 1
                continue
            truncated += cut
            for ids, mask in fitted:
                ids_out.append(np.asarray(ids, dtype=np.int32))
                masks.append(mask)
                lengths.append(len(ids))
        return Encoded(
            np.concatenate(ids_out) if ids_out else np.zeros(0, np.int32),
            np.concatenate(masks) if masks else np.zeros(0, np.uint8),
            np.asarray(lengths, dtype=np.int64),
            dropped=dropped,
            truncated=truncated,
            identical=getattr(prepared, "identical", 0),
        )


def _two_by_two(items: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    it = iter(items)
    for first in it:
        yield first, next(it)


Side = tuple[list[int], list[tuple[int, int]]]  # token ids, target token ranges [lo, hi)


def fit_pair(chosen: Side, rejected: Side, max_length: int) -> tuple[list[tuple[list[int], np.ndarray]] | None, bool]:
    """Apply the truncation rule (module docstring) to one pair.

    Returns:
        ([(ids, uint8 mask) of chosen, of rejected], whether anything was cut), or (None, cut) when
        a side is left without a target token.
    """
    prompt = min(chosen[1][0][0], rejected[1][0][0])  # tokens before the first target, shared
    longest = max(len(chosen[0]), len(rejected[0]))
    drop = max(0, min(longest - max_length, prompt - min(prompt, max_length // 2)))
    cut = longest > max_length
    out = []
    for ids, ranges in (chosen, rejected):
        ids = ids[drop : drop + max_length]
        n = len(ids)
        # position 0 is never a target (nothing predicts it); ranges past the cut are gone
        kept = [(max(lo - drop, 1), min(hi - drop, n)) for lo, hi in ranges]
        kept = [(lo, hi) for lo, hi in kept if lo < hi]
        if not kept:
            return None, cut
        mask = np.zeros(n, dtype=np.uint8)
        for lo, hi in kept:
            mask[lo:hi] = 1
        out.append((ids, mask))
    return out, cut
