"""From data files to packed training batches (pretraining and chat fine-tuning).

The stages, one module each::

    sources   files / folders / pkg:// paths -> (location, raw record), streamed
    formats   raw record -> Conversation (tuple of Message) or a pretraining document (str)
    encode    sample -> token ids + target mask (chat templates from tunex.templates)
    store     the encoded dataset cached on disk as memory-mapped numpy arrays
    pack      samples -> max_length sequences with per-sample position ids; batch orders
    dataset   items, deterministic resumable batches, collation

The trainer calls :func:`build_dataset`, :func:`make_loader` and :func:`collate`.
"""

from __future__ import annotations

from tunex.data.dataset import BatchLoader, TokenDataset, build_dataset, collate, make_loader
from tunex.data.formats import FORMATS, Message

__all__ = ["BatchLoader", "FORMATS", "Message", "TokenDataset", "build_dataset", "collate", "make_loader"]
