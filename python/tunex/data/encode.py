"""Samples -> token ids and a target mask (labels = ids where the mask is set, else -100).

Pretraining: every token is a target; each document ends with EOS (and starts with BOS when the
tokenizer adds one); documents longer than ``max_length`` are cut into ``max_length`` pieces so no
text is lost.

Chat: the template (:mod:`tunex.templates`) renders the conversation into (text, is_target)
segments; the whole text is tokenized at once, exactly as it reads, and a token is a target when any
of its characters lies in a target segment (each assistant reply plus its end-of-turn token).
Tokenizing the whole text (not segment by segment) keeps ids identical to ``encode(render(...))``
for every tokenizer, including SentencePiece ones that add a space before each separately encoded
piece. Samples longer than ``max_length`` are cut at the end; a sample left without targets is
dropped and counted.

The first token's label is never a target: nothing precedes it, so no position predicts it. This
makes the summed loss of a packed sequence equal the summed losses of its samples run one by one.

Labels are aligned with ``input_ids`` (not shifted); the loss shifts them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunex.data.formats import Conversation, Sample, with_system

ENCODER_VERSION = "2"  # bump when the encoded output of the same inputs changes (invalidates caches)
_VERIFY_FIRST = 32  # renders (and prefix splits) per shape checked against the slow, sure way
_MIN_PREFIX = 32  # chars of fixed prefix worth tokenizing once (a bare <|im_start|> is not)


@dataclass
class Encoded:
    """Encoded samples of one batch, flat: ids/mask concatenated, lengths per sample."""

    ids: np.ndarray  # int32 (N,)
    mask: np.ndarray  # uint8 (N,) 1 = target
    lengths: np.ndarray  # int64 (S,)
    dropped: int = 0  # samples that ended up with no target
    truncated: int = 0  # samples cut at max_length
    identical: int = 0  # preference pairs whose chosen and rejected render the same


@dataclass
class Prepared:
    """Texts ready for the tokenizer: documents (spans None) or rendered chats with target spans."""

    texts: list[str]
    spans: list[list[tuple[int, int]]] | None
    dropped: int = 0
    prefixes: list[int] | None = None  # per chat text: chars of a fixed prefix ending at a special token


def backend_of(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a :class:`tunex.tokenizer.Tokenizer` (or itself)."""
    return getattr(tokenizer, "backend", tokenizer)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(backend_of(tokenizer).to_str().encode())
    for name in ("bos_token", "eos_token", "pad_token", "chat_template"):
        h.update(f"\0{name}={getattr(tokenizer, name, None)}".encode())
    return h.hexdigest()


# ---- rendering with a per-shape skeleton -----------------------------------------------------------

_SENTINEL = " \n\x00tunex{}\x00 \n"  # leading/trailing whitespace: templates that trim are caught


class _Skeleton:
    """A template's rendering of one conversation shape with the contents left as holes.

    ``parts`` alternates literal text and message indices; ``targets`` marks, per part, whether it
    is inside a target segment. Filling the holes is plain string joining: no template call.
    """

    def __init__(self, parts: list[str | int], targets: list[bool]):
        self.parts, self.targets = parts, targets
        self.prefix: int | None = None  # see Renderer._fixed_prefix

    def fill(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for part, target in zip(self.parts, self.targets):
            text = conv[part].content if isinstance(part, int) else part
            end = pos + len(text)
            if target and end > pos:
                if spans and spans[-1][1] == pos:
                    spans[-1] = (spans[-1][0], end)
                else:
                    spans.append((pos, end))
            pieces.append(text)
            pos = end
        return "".join(pieces), spans


class Renderer:
    """Conversation -> (text, target char spans), through a :class:`tunex.templates.ChatTemplate`.

    Rendering a jinja template costs several full renders per conversation (one per assistant turn
    to find where each reply sits). Conversations of the same shape (roles, loss flags, which
    contents are empty) render to the same text around their contents, so the template is asked
    once per shape, with placeholders as contents, and later conversations fill the placeholders
    in. The first renders of each shape are checked against the template's own output; a template
    that treats contents other than verbatim (trims them, branches on them) falls back to rendering
    every conversation.
    """

    def __init__(self, template: Any, special_tokens: Sequence[str] = ()):
        self.template = template
        self.special_tokens = [t for t in special_tokens if t]
        self._shapes: dict[tuple, _Skeleton | None] = {}
        self._checked: dict[tuple, int] = {}

    def __call__(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        text, spans, _ = self.render(conv)
        return text, spans

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]], int]:
        """(text, target spans, length of the shape's fixed prefix ending at a special token, or 0)."""
        # empty contents get shapes of their own: templates commonly skip an empty system prompt
        key = tuple((m.role, m.loss, not m.content) for m in conv)
        if key not in self._shapes:
            self._shapes[key] = self._skeleton(conv)
        skeleton = self._shapes[key]
        if skeleton is None:
            return (*self._render(conv), 0)
        text, spans = skeleton.fill(conv)
        seen = self._checked.get(key, 0)
        if seen < _VERIFY_FIRST:
            self._checked[key] = seen + 1
            slow = self._render(conv)
            if slow != (text, spans):
                self._shapes[key] = None
                return (*slow, 0)
        return text, spans, self._fixed_prefix(skeleton)

    def _fixed_prefix(self, skeleton: _Skeleton) -> int:
        """Chars of the text before the first content that end with a special token (cached)."""
        if skeleton.prefix is None:
            head = skeleton.parts[0] if skeleton.parts and isinstance(skeleton.parts[0], str) else ""
            ends = [head.rfind(t) + len(t) for t in self.special_tokens if head.rfind(t) >= 0]
            skeleton.prefix = max(ends, default=0)
        return skeleton.prefix

    def _render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        segments = self.template.segments([m.as_dict() for m in conv])
        replies = [m for m in conv if m.role == "assistant"]
        targets = [s for s in segments if s.is_target]
        if len(targets) != len(replies):  # cannot tell replies apart: train them all
            keep = [True] * len(targets)
        else:
            keep = [m.loss for m in replies]
        pos, spans, k = 0, [], 0
        for s in segments:
            end = pos + len(s.text)
            if s.is_target:
                if keep[k]:
                    spans.append((pos, end))
                k += 1
            pos = end
        return "".join(s.text for s in segments), spans

    def _skeleton(self, conv: Conversation) -> _Skeleton | None:
        marks = [_SENTINEL.format(i) for i in range(len(conv))]
        probe = [dict(m.as_dict(), content=marks[i]) for i, m in enumerate(conv)]
        try:
            segments = self.template.segments(probe)
        except Exception:  # noqa: BLE001 - an odd template: the slow path reports real errors
            return None
        parts: list[str | int] = []
        targets: list[bool] = []
        found: list[int] = []
        for s in segments:
            # split on the sentinel's NULs: odd chunks are "tunex<i>", even ones literal text
            chunks = s.text.split("\x00")
            if len(chunks) % 2 == 0 or not all(c[:5] == "tunex" and c[5:].isdigit() for c in chunks[1::2]):
                return None
            holes = [int(c[5:]) for c in chunks[1::2]]
            # a target segment is trained only if the replies it holds are (openai "loss": false)
            target = s.is_target and all(conv[i].loss for i in holes if conv[i].role == "assistant")
            for j, chunk in enumerate(chunks):
                parts.append(holes[j // 2] if j % 2 else chunk)
                targets.append(target)
            found += holes
        if sorted(found) != list(range(len(conv))):
            return None
        return self._strip_sentinel_space(parts, targets)

    @staticmethod
    def _strip_sentinel_space(parts: list[str | int], targets: list[bool]) -> _Skeleton | None:
        # The whitespace around each NUL pair is part of the sentinel: it must be there, verbatim.
        head, tail = _SENTINEL.split("\x00")[0], _SENTINEL.split("\x00")[-1]
        for i, part in enumerate(parts):
            if isinstance(part, int):
                before, after = parts[i - 1], parts[i + 1]
                if not (
                    isinstance(before, str)
                    and before.endswith(head)
                    and isinstance(after, str)
                    and after.startswith(tail)
                ):
                    return None
                parts[i - 1], parts[i + 1] = before[: len(before) - len(head)], after[len(tail) :]
        return _Skeleton(parts, targets)


# ---- tokenizing ------------------------------------------------------------------------------------


class Encoder:
    """Turns mapped samples into ids + target masks for one (tokenizer, template, max_length)."""

    def __init__(self, tokenizer: Any, *, template: Any = None, system: str = "", max_length: int = 2048):
        self.backend = backend_of(tokenizer)
        if self.backend.truncation is not None or self.backend.padding is not None:
            # some tokenizer.json files switch these on; here max_length and packing decide lengths
            from tokenizers import Tokenizer as Backend

            self.backend = Backend.from_str(self.backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.renderer = Renderer(template, _split_tokens(self.backend)) if template is not None else None
        self._prefix_ids: dict[str, list[int] | None] = {}  # None: this prefix does not split cleanly
        self._prefix_checked: dict[str, int] = {}
        self.system = system
        self.max_length = max_length

    def encode(self, samples: Sequence[Sample]) -> Encoded:
        return self.tokenize(self.prepare(samples))

    def prepare(self, samples: Sequence[Sample]) -> Prepared:
        """The Python half: render conversations to text + target spans (no tokenizer call)."""
        docs = [s for s in samples if isinstance(s, str)]
        if docs and len(docs) == len(samples):
            return Prepared(docs, None, sum(1 for d in docs if not d))
        if docs:
            raise TypeError("a batch mixes documents and conversations")
        if self.renderer is None:
            raise ValueError("conversations need a chat template; pass template=")
        texts, all_spans, prefixes = [], [], []
        dropped = 0
        for conv in samples:
            conv = with_system(conv, self.system)
            if not any(m.loss for m in conv):
                dropped += 1
                continue
            text, spans, prefix = self.renderer.render(conv)
            if not spans:
                dropped += 1
                continue
            texts.append(text)
            all_spans.append(spans)
            prefixes.append(prefix)
        return Prepared(texts, all_spans, dropped, prefixes)

    def tokenize(self, prepared: Prepared) -> Encoded:
        """The Rust half: tokenize (the GIL is released meanwhile) and lay out ids and masks."""
        if prepared.spans is None:
            return self._pretrain(prepared.texts, prepared.dropped)
        return self._chat(prepared.texts, prepared.spans, prepared.dropped, prepared.prefixes)

    def _pretrain(self, docs: list[str], dropped: int) -> Encoded:
        eos = self.eos_id
        ids_out, lengths = [], []
        for enc in self.backend.encode_batch(docs, add_special_tokens=True):
            ids = enc.ids
            if eos is not None and (not ids or ids[-1] != eos):  # some post-processors add it already
                ids.append(eos)
            for start in range(0, len(ids), self.max_length):
                piece = ids[start : start + self.max_length]
                if len(piece) > 1:  # one token alone has nothing to predict
                    ids_out.extend(piece)
                    lengths.append(len(piece))
        ids = np.asarray(ids_out, dtype=np.int32)
        lengths_arr = np.asarray(lengths, dtype=np.int64)
        mask = np.ones(len(ids), dtype=np.uint8)
        mask[_starts(lengths_arr)] = 0
        return Encoded(ids, mask, lengths_arr, dropped=dropped)

    def _chat(
        self, texts: list[str], all_spans: list[list[tuple[int, int]]], dropped: int, prefixes: list[int] | None = None
    ) -> Encoded:
        ids_out: list[int] = []
        lengths: list[int] = []
        begins: list[int] = []  # target token ranges, as positions in ids_out
        ends: list[int] = []
        truncated = 0
        limit = self.max_length
        for ids, ranges in self._tokenized(texts, all_spans, prefixes or [0] * len(texts)):
            n = len(ids)
            if n > limit:
                truncated += 1
                ids, n = ids[:limit], limit
            # position 0 is never a target (nothing predicts it); ranges past the cut are gone
            ranges = [(max(lo, 1), min(hi, n)) for lo, hi in ranges]
            ranges = [(lo, hi) for lo, hi in ranges if lo < hi]
            if not ranges:
                dropped += 1
                continue
            base = len(ids_out)
            begins += [base + lo for lo, _ in ranges]
            ends += [base + hi for _, hi in ranges]
            ids_out.extend(ids)
            lengths.append(n)
        edges = np.zeros(len(ids_out) + 1, dtype=np.int32)
        np.add.at(edges, np.asarray(begins, dtype=np.int64), 1)
        np.add.at(edges, np.asarray(ends, dtype=np.int64), -1)
        mask = (np.cumsum(edges[:-1]) > 0).astype(np.uint8)
        return Encoded(
            np.asarray(ids_out, dtype=np.int32),
            mask,
            np.asarray(lengths, dtype=np.int64),
            dropped=dropped,
            truncated=truncated,
        )

    def _tokenized(
        self, texts: list[str], all_spans: list[list[tuple[int, int]]], prefixes: list[int]
    ) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, target token ranges) per text.

        The tokenizer splits its input at special tokens and tokenizes the pieces independently, so
        a template's fixed opening (a system prompt, say) that ends with a special token tokenizes
        the same on its own: it is tokenized once and only the rest of each text is sent to the
        tokenizer. The first uses of each prefix are checked against tokenizing the whole text; a
        tokenizer that does not split that way (whitespace-stripping or position-dependent
        pre-tokenizers) keeps the whole-text path.
        """
        cuts = [
            cut if cut >= _MIN_PREFIX and spans[0][0] >= cut and self._prefix_ids.get(text[:cut], ()) is not None else 0
            for text, spans, cut in zip(texts, all_spans, prefixes)
        ]
        rests = [text[cut:] for text, cut in zip(texts, cuts)]
        for text, spans, cut, enc in zip(
            texts, all_spans, cuts, self.backend.encode_batch(rests, add_special_tokens=False)
        ):
            if not cut:
                yield enc.ids, _token_ranges(enc, spans)
                continue
            prefix = text[:cut]
            ids = self._prefix(prefix) + enc.ids
            checked = self._prefix_checked.get(prefix, 0)
            if checked < _VERIFY_FIRST:
                whole = self.backend.encode(text, add_special_tokens=False)
                if whole.ids != ids:
                    self._prefix_ids[prefix] = None  # this tokenizer does not split here: never again
                    yield whole.ids, _token_ranges(whole, spans)
                    continue
                self._prefix_checked[prefix] = checked + 1
            shift = len(ids) - len(enc.ids)
            local = [(a - cut, b - cut) for a, b in spans]
            yield ids, [(lo + shift, hi + shift) for lo, hi in _token_ranges(enc, local)]

    def _prefix(self, prefix: str) -> list[int]:
        ids = self._prefix_ids.get(prefix)
        if ids is None:
            if len(self._prefix_ids) > 4096:  # shapes are few; bound the memo regardless
                self._prefix_ids.clear()
            ids = self._prefix_ids[prefix] = self.backend.encode(prefix, add_special_tokens=False).ids
        return ids


def _split_tokens(backend: Any) -> list[str]:
    """Special tokens the tokenizer splits its input at, unchanged (no stripping of neighbours)."""
    try:
        added = backend.get_added_tokens_decoder().values()
    except AttributeError:  # tokenizers older than 0.19
        return []
    return [t.content for t in added if t.special and not (t.lstrip or t.rstrip or t.single_word or t.normalized)]


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) if len(lengths) else lengths


def _token_ranges(enc: Any, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token index ranges [lo, hi) of the tokens overlapping each character span [start, end)."""
    out = []
    offsets = None
    for start, end in spans:
        lo, hi = enc.char_to_token(start), enc.char_to_token(end - 1)
        if lo is None or hi is None:  # a character no token covers (normalized away): scan offsets
            if offsets is None:
                offsets = enc.offsets
            lo = next((i for i, (a, b) in enumerate(offsets) if b > start and b > a), len(offsets))
            hi = max((i for i, (a, b) in enumerate(offsets) if a < end and b > a), default=-1)
            if hi < lo:
                continue
        out.append((lo, hi + 1))
    return out
