"""Human-readable views of the data at each stage (for check-custom-dataset and log-dataset)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunex.data import formats as F
from tunex.data import sources as S
from tunex.data.store import Recipe, records

MASK_MARK = "[-100 x{n}]"  # stands for a run of n tokens that are not trained on


@dataclass
class Stages:
    """The first usable record of a dataset, as each stage sees it."""

    where: str
    raw: Any
    sample: F.Sample
    rendered: str | None  # None for pretraining documents
    spans: list[tuple[int, int]]  # target character spans of ``rendered``
    ids: np.ndarray
    mask: np.ndarray
    rejected: Stages | None = None  # a preference pair's other side (this one is the chosen side)


def first_stages(data_cfg: Any, tokenizer: Any) -> Stages | None:
    """Walk the first record that yields a trainable sample through every stage."""
    recipe = Recipe(data_cfg.format, tokenizer, data_cfg.template, data_cfg.system, data_cfg.max_length)
    encoder = recipe.encoder()
    for chunk in S.scan(S.list_files(data_cfg.path, data_cfg.format))[1]:
        for where, raw, sample in records(chunk, data_cfg.format):
            enc = encoder.encode([sample])
            if not len(enc.lengths):
                continue
            place = where if isinstance(where, S.Where) else S.Where(chunk.file, line=where)
            if hasattr(sample, "sides"):  # a preference pair: chosen, then rejected
                views = [encoder.renderer(F.with_system(side, data_cfg.system)) for side in sample.sides()]
                c, r = int(enc.lengths[0]), int(enc.lengths[1])
                other = Stages(str(place), raw, sample, *views[1], enc.ids[c : c + r], enc.mask[c : c + r])
                return Stages(str(place), raw, sample, *views[0], enc.ids[:c], enc.mask[:c], other)
            rendered, spans = None, []
            if not isinstance(sample, str):
                rendered, spans = encoder.renderer(F.with_system(sample, data_cfg.system))
            n = int(enc.lengths[0])
            return Stages(str(place), raw, sample, rendered, spans, enc.ids[:n], enc.mask[:n])
    return None


def sample_text(sample: F.Sample) -> str:
    if hasattr(sample, "sides"):  # a preference pair
        parts = {"prompt": sample.prompt, "chosen": sample.chosen, "rejected": sample.rejected}
        return "\n".join(f"{k}: " + json.dumps([m.as_dict() for m in v], ensure_ascii=False) for k, v in parts.items())
    if isinstance(sample, str):
        return json.dumps({"text": sample}, ensure_ascii=False)
    return "\n".join(json.dumps(m.as_dict(), ensure_ascii=False) for m in sample)


def marked_text(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each target span wrapped in ``[[ ]]``."""
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], "[[", text[a:b], "]]"]
        pos = b
    out.append(text[pos:])
    return "".join(out)


def masked_text(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> str:
    """The decoded targets, with every run of non-target tokens replaced by ``[-100 xN]``."""
    out: list[str] = []
    targets = labels != -100
    start = 0
    for end in list(np.flatnonzero(np.diff(targets.astype(np.int8))) + 1) + [len(ids)]:
        if end == start:
            continue
        if targets[start]:
            out.append(tokenizer.decode(ids[start:end].tolist()))
        else:
            out.append(MASK_MARK.format(n=end - start))
        start = end
    return "".join(out)


def totals_table(stats: dict, max_length: int) -> list[tuple[str, str]]:
    rows = [
        ("records", stats["records"]),
        ("dropped (no target)", stats["dropped"]),
        ("truncated at max_length", stats["truncated"]),
        *([("chosen == rejected (pairs)", stats["identical_pairs"])] if "identical_pairs" in stats else []),
        ("samples", stats["samples"]),
        ("tokens", stats["tokens"]),
        ("target tokens", stats["target_tokens"]),
    ]
    seqs = stats["sequences"]
    if stats.get("packed"):
        fill = stats["tokens"] / max(1, seqs * max_length)
        rows.append(("packed sequences", f"{seqs} (of {max_length} tokens, {fill:.1%} full)"))
    else:
        rows.append(("sequences (unpacked)", seqs))
    share = stats["target_tokens"] / max(1, stats["tokens"])
    rows.append(("target share", f"{share:.1%}"))
    return [(k, f"{v:,}" if isinstance(v, int) else str(v)) for k, v in rows]
