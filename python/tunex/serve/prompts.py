"""The serve engine's cache of finished prompt passes: a job whose prompt was run before (same
adapter, same token ids, same KV cache size) starts from a copy of that pass's keys, values and
last logits instead of running it again.

The copy is exact: a prompt pass is the same code on the same input into a cache of the same size
(whose size sets the strides of the keys and values attention reads and the rope table's length),
so it would compute these bits again. A prompt that only shares a prefix with an earlier one is
run whole: its later positions computed over a cached prefix would not be bit for bit what a
pass over the whole prompt computes (products over other row counts, another attention path),
and a served reply must equal the same request served alone.

Entries are kept most recently used first, within a byte budget; the least recently used leave.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PromptCache:
    """Finished prompt passes by (adapter, prompt ids, cache size), within ``budget`` bytes."""

    def __init__(self, budget: int):
        if budget < 0:
            raise ValueError(f"the prompt cache's budget must be >= 0 bytes (0: off), got {budget}")
        self.budget = budget
        self.used = 0
        self.hits = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @staticmethod
    def key(adapter: str | None, prompt_ids: list[int], size: int) -> tuple:
        return adapter, tuple(prompt_ids), size

    def restore(self, key: tuple, cache) -> torch.Tensor | None:
        """Fill ``cache`` (a fresh KVCache) with the pass stored under ``key`` and return its last
        logits; None (the cache untouched) when there is none."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        k, v, logits = entry
        n = k.shape[3]
        cache.k[:, :, :, :n] = k
        cache.v[:, :, :, :n] = v
        cache.advance(n)
        self.hits += 1
        return logits.clone()

    def store(self, key: tuple, cache, logits: torch.Tensor) -> None:
        """Keep a copy of the prompt pass just run into ``cache`` (its ``length`` positions) and its
        last ``logits``, if it fits in the budget (the least recently used entries leave for it)."""
        n = cache.length
        k, v = cache.k[:, :, :, :n], cache.v[:, :, :, :n]
        size = _bytes(k, v, logits)
        if size > self.budget or key in self._entries:
            return
        while self.used + size > self.budget:
            _, entry = self._entries.popitem(last=False)
            self.used -= _bytes(*entry)
        self._entries[key] = (k.clone(), v.clone(), logits.clone())
        self.used += size


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
