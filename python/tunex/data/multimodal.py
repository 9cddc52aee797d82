"""Image + text training data for LLaVA runs: records -> tokens with image placeholders -> packed items.

Formats (``data.format``):
    llava   LLaVA's JSON: {"id", "image": "a.jpg" (or a list), "conversations": [{"from": "human",
            "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}; a record without "image" is text only
    openai  {"messages": [{"role", "content"}]} where a content may be a list of parts:
            {"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": PATH}} or
            {"type": "image", "image": PATH}

Image paths are relative to ``data.image_folder`` (default: the data file's folder). Each ``<image>``
in a turn becomes ``image_tokens`` copies of the image token id, never a target; a record with an
image but no ``<image>`` gets one before its first user turn (as LLaVA). Images are checked
(decoded) when the data is read: a missing or broken one is an error naming the record and the file,
unless ``data.skip_bad_images`` (then the record is skipped and counted).

The tokenized samples stay in memory (ids, labels and image paths); packing and batch order are the
text pipeline's (tunex.data.pack), so packed samples keep their own positions and images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunex.data import formats as F
from tunex.data import sources as S
from tunex.data.encode import Renderer, _split_tokens, _token_ranges, backend_of
from tunex.data.pack import pack, position_ids
from tunex.errors import DataError

IMAGE = "<image>"
IGNORE_INDEX = -100
IMAGE_FORMATS = ("llava", "openai")


@dataclass
class ImageRecord:
    conversation: F.Conversation
    images: list[str]


@dataclass
class ImageSample:
    ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64, -100 where not a target (image positions always)
    images: list[str]


@dataclass
class ImageData:
    samples: list[ImageSample]
    stats: dict[str, Any] = field(default_factory=dict)

    def subset(self, indices) -> ImageData:
        """The samples at ``indices`` (in that order), their counts in ``stats`` (records read and
        skipped stay the whole data's)."""
        samples = [self.samples[int(i)] for i in indices]
        return ImageData(samples, {**self.stats, **_counts(samples)})


def _counts(samples: list[ImageSample]) -> dict[str, int]:
    return {
        "samples": len(samples),
        "images": sum(len(s.images) for s in samples),
        "tokens": int(sum(len(s.ids) for s in samples)),
        "target_tokens": int(sum(int((s.labels != IGNORE_INDEX).sum()) for s in samples)),
    }


def _image_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise F.RecordError(f"{where}: expected an image path or a list of paths, got {value!r}")


def llava_record(record: Any) -> ImageRecord:
    conv = F.sharegpt(record)
    return ImageRecord(conv, _image_list(record.get("image"), "image"))


def _part_image(part: dict, where: str) -> str:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    else:
        url = part.get("image") or part.get("path") or part.get("url")
    if not isinstance(url, str) or not url:
        raise F.RecordError(f"{where}: expected the image's path (image_url.url or image), got {part!r}")
    if url.startswith(("http://", "https://", "data:")):
        raise F.RecordError(f"{where}: {url[:40]!r}: tunex reads image files; download the images and give paths")
    return url.removeprefix("file://")


def openai_record(record: Any) -> ImageRecord:
    messages = record if isinstance(record, list) else F._list_field(record, "messages")
    flat, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            flat.append(m)
            continue
        pieces = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise F.RecordError(f"{where}: expected a part object with 'type', got {F._kind(part)}")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise F.RecordError(f"{where}.text: expected a string")
                pieces.append(part["text"])
            elif part.get("type") in ("image_url", "image"):
                images.append(_part_image(part, where))
                pieces.append(IMAGE + "\n")
            else:
                raise F.RecordError(f"{where}.type: expected 'text', 'image_url' or 'image', got {part.get('type')!r}")
        flat.append({**m, "content": "".join(pieces)})
    return ImageRecord(F.openai({"messages": flat}), images)


MAPPERS = {"llava": llava_record, "openai": openai_record}


def with_placeholders(rec: ImageRecord) -> F.Conversation:
    """The conversation with exactly one ``<image>`` per image (one added before the first user
    turn when the record has images but names none)."""
    found = sum(m.content.count(IMAGE) for m in rec.conversation)
    if found == len(rec.images):
        return rec.conversation
    if found == 0:
        conv = list(rec.conversation)
        first = next((i for i, m in enumerate(conv) if m.role == "user"), None)
        if first is not None:
            m = conv[first]
            conv[first] = F.Message(m.role, IMAGE * len(rec.images) + "\n" + m.content, m.loss)
            return tuple(conv)
    raise F.RecordError(f"the record has {len(rec.images)} image(s) but {found} {IMAGE} placeholder(s)")


def image_path(given: str, data_file: str, image_folder: str) -> Path:
    path = Path(given)
    if path.is_absolute():
        return path
    return (Path(image_folder) if image_folder else Path(data_file).parent) / path


def check_image(path: Path) -> str | None:
    """Why ``path`` is not a usable image (None when it decodes)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "image file not found"
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at a fraction of the size (a broken file still fails)
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"not an image Pillow can decode ({exc})"
    return None


class ImageEncoder:
    """Conversations with ``<image>`` -> (ids, labels) with ``image_tokens`` image ids per image."""

    def __init__(self, tokenizer: Any, template: Any, image_token_id: int, image_tokens: int, max_length: int):
        self.backend = backend_of(tokenizer)
        self.renderer = Renderer(template, _split_tokens(self.backend))
        self.image_token_id, self.image_tokens, self.max_length = image_token_id, image_tokens, max_length

    def encode(self, conv: F.Conversation) -> tuple[np.ndarray, np.ndarray] | None:
        """None when the sample has no target left (or its images do not fit in max_length)."""
        text, spans, _ = self.renderer.render(conv)
        ids: list[int] = []
        target: list[bool] = []
        pos = 0
        for k, piece in enumerate(text.split(IMAGE)):
            if k:
                ids += [self.image_token_id] * self.image_tokens
                target += [False] * self.image_tokens
                pos += len(IMAGE)
            if piece:
                enc = self.backend.encode(piece, add_special_tokens=False)
                local = [(max(a, pos) - pos, min(b, pos + len(piece)) - pos) for a, b in spans]
                flags = [False] * len(enc.ids)
                for lo, hi in _token_ranges(enc, [(a, b) for a, b in local if a < b]):
                    flags[lo:hi] = [True] * (hi - lo)
                ids += enc.ids
                target += flags
            pos += len(piece)
        ids_arr = np.asarray(ids, dtype=np.int64)
        if len(ids_arr) > self.max_length:
            if np.any(ids_arr[self.max_length :] == self.image_token_id):
                return None  # cutting through an image would leave its features nowhere to go
            ids_arr, target = ids_arr[: self.max_length], target[: self.max_length]
        labels = np.where(np.asarray(target, dtype=bool), ids_arr, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
        if not (labels != IGNORE_INDEX).any():
            return None
        return ids_arr, labels


def read_image_data(data_cfg: Any, tokenizer: Any, template: Any, image_token_id: int, image_tokens: int) -> ImageData:
    """Read, check and tokenize every record of ``data_cfg.path``.

    Raises:
        DataError naming the file and record for a malformed record or (without
        ``skip_bad_images``) a missing or undecodable image.
    """
    if data_cfg.format not in IMAGE_FORMATS:
        raise DataError(f"data.format {data_cfg.format!r}: a [vision] run reads {' or '.join(IMAGE_FORMATS)} records")
    mapper = MAPPERS[data_cfg.format]
    encoder = ImageEncoder(tokenizer, template, image_token_id, image_tokens, data_cfg.max_length)
    files = S.list_files(data_cfg.path, data_cfg.format)
    _, chunks = S.scan(files)
    samples: list[ImageSample] = []
    stats = {"records": 0, "dropped": 0, "bad_images": 0, "images": 0}
    for chunk in chunks:
        for where, record in S.read_chunk(chunk):
            stats["records"] += 1
            place = where if isinstance(where, S.Where) else S.Where(chunk.file, line=where)
            try:
                rec = mapper(record)
                conv = F.with_system(with_placeholders(rec), data_cfg.system)
            except F.RecordError as exc:
                raise DataError(f"{place}: {exc}") from None
            paths = [image_path(p, chunk.file, data_cfg.image_folder) for p in rec.images]
            bad = next(((p, why) for p in paths if (why := check_image(p)) is not None), None)
            if bad is not None:
                if not data_cfg.skip_bad_images:
                    raise DataError(
                        f"{place}: image {bad[0]}: {bad[1]}; fix data.image_folder or the record, or set "
                        "data.skip_bad_images = true to skip such records"
                    )
                stats["bad_images"] += 1
                continue
            encoded = encoder.encode(conv)
            if encoded is None:
                stats["dropped"] += 1
                continue
            samples.append(ImageSample(*encoded, [str(p) for p in paths]))
            stats["images"] += len(paths)
    if not samples:
        raise DataError(f"{data_cfg.path}: no usable sample ({stats})")
    return ImageData(samples, {**stats, **_counts(samples)})


class ImageDataset:
    """Items (one packed sequence, or one sample) with their images' pixel values.

    ``item["pixel_values"]`` is (N, 3, H, W) for the N images of the item in reading order.
    """

    def __init__(
        self,
        data: ImageData,
        processing: Any,
        aspect: str,
        *,
        packed: bool,
        max_length: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.data, self.processing, self.aspect, self.packed = data, processing, aspect, packed
        lengths = np.asarray([len(s.ids) for s in data.samples], dtype=np.int64)
        n = len(lengths)
        if packed:
            order = np.random.default_rng([seed, 0x5EED]).permutation(n) if shuffle else None
            self.members, self.starts = pack(lengths, max_length, order)
        else:
            self.members, self.starts = np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)
        per = lengths[self.members]
        cum = np.concatenate(([0], np.cumsum(per)))
        self.lengths = cum[self.starts[1:]] - cum[self.starts[:-1]]
        self.pad_id = 0
        self.stats = {**data.stats, "sequences": len(self), "packed": packed}

    def __len__(self) -> int:
        return len(self.starts) - 1

    def samples(self, index: int) -> list[ImageSample]:
        return [self.data.samples[int(s)] for s in self.members[self.starts[index] : self.starts[index + 1]]]

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, position_ids) of item ``index`` (no image is decoded)."""
        parts = self.samples(index)
        return (
            np.concatenate([s.ids for s in parts]),
            np.concatenate([s.labels for s in parts]),
            position_ids(np.asarray([len(s.ids) for s in parts])),
        )

    def images(self, index: int) -> list[str]:
        return [p for s in self.samples(index) for p in s.images]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        from tunex.data.images import pixel_values

        ids, labels, pos = self.arrays(index)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
            "pixel_values": pixel_values(self.images(index), self.processing, self.aspect),
        }


def image_spans(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of the image placeholders in ``ids`` (one per run of image ids)."""
    is_image = np.concatenate(([False], np.asarray(ids) == image_token_id, [False]))
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def image_text(tokenizer: Any, ids: np.ndarray, image_token_id: int, labels: np.ndarray | None = None) -> str:
    """``ids`` decoded with each image's positions shown as ``<image: N tokens at a..b>``; with
    ``labels``, targets in [[ ]] and other text as is (what ``log-dataset`` prints)."""
    out, pos = [], 0
    for start, end in [*image_spans(ids, image_token_id), (len(ids), len(ids))]:
        piece = ids[pos:start]
        if labels is None:
            out.append(tokenizer.decode(piece.tolist()))
        else:
            out.append(_marked(tokenizer, piece, labels[pos:start]))
        if end > start:
            out.append(f"<image: {end - start} tokens at {start}..{end}>")
        pos = end
    return "".join(out)


def _marked(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> str:
    target = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate(([False], target, [False])).astype(np.int8)))
    text, pos = [], 0
    for lo, hi in zip(edges[::2], edges[1::2]):
        text += [tokenizer.decode(ids[pos:lo].tolist()), "[[", tokenizer.decode(ids[lo:hi].tolist()), "]]"]
        pos = hi
    text.append(tokenizer.decode(ids[pos:].tolist()))
    return "".join(text)
