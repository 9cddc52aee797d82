"""Answering with images: a LLaVA folder's prompt -> tokens with each ``<image>`` expanded to the
image's positions (as transformers' LlavaProcessor does) -> generation with the images' features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tunex.models.llava import IMAGE_TOKEN, LlavaModel


def folder_processing(folder: Path):
    """(ImageProcessing, aspect) of a LLaVA folder's preprocessor_config.json (``do_pad``: pad-to-square)."""
    import json

    from tunex.data.images import processing_from_dict

    path = Path(folder) / "preprocessor_config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    return processing_from_dict(raw, str(path)), "pad" if raw.get("do_pad") else "resize"


def with_image_placeholders(text: str, n_images: int) -> str:
    """``text`` with one ``<image>`` per image: those it names, else ``<image>\\n`` each before it."""
    found = text.count(IMAGE_TOKEN)
    if found == n_images:
        return text
    if found == 0:
        return (IMAGE_TOKEN + "\n") * n_images + text
    raise ValueError(f"the message names {found} {IMAGE_TOKEN} but {n_images} image(s) were given")


def expand_image_tokens(ids: Sequence[int], image_id: int, per_image: int) -> list[int]:
    out: list[int] = []
    for i in ids:
        out.extend([i] * per_image if i == image_id else [i])
    return out


def generate_llava_text(
    model: LlavaModel,
    tokenizer,
    prompt: str,
    pixel_values: torch.Tensor | None,
    config=None,
    *,
    streamer: Callable[[str], None] | None = None,
) -> str:
    """Generate from a rendered prompt holding one ``<image>`` per image of ``pixel_values``."""
    from tunex.models.generate import GenerationConfig, generate_reply

    cfg = GenerationConfig(**(config.__dict__ if config else {}))
    prompt_ids = expand_image_tokens(
        tokenizer.encode(prompt, add_special_tokens=False), model.image_token_id, model.image_tokens
    )
    return generate_reply(
        model.with_images(pixel_values), tokenizer, prompt_ids, cfg, model.config.eos_token_ids, streamer=streamer
    )
