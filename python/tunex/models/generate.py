"""Text generation with a KV cache: greedy or sampled, with the usual logit processors.

Processing order follows transformers' generate: repetition penalty, then temperature, top-k and
top-p, so greedy decoding (``temperature=0``) reproduces its tokens exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tunex.kernels import registry
from tunex.kernels.gemv import enabled as gemv_enabled


@dataclass
class GenerationConfig:
    """Decoding settings.

    ``temperature=0`` means greedy. ``top_k=0`` and ``top_p=1.0`` disable those filters.
    ``stop_token_ids`` end generation without being returned; ``stop_words`` are strings checked
    on the decoded text (needs a tokenizer) and are cut from :func:`generate_text`'s result.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=list)
    stop_words: Sequence[str] = field(default_factory=list)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


def process_logits(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Apply penalty, temperature, top-k and top-p to next-token logits (V,) in fp32."""
    if cfg.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending, like transformers
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


@contextlib.contextmanager
def decode_threads(device: torch.device) -> Iterator[None]:
    """One torch thread while decoding on the CPU.

    A decode step is ~200 matrix-vector products, which the Rust GEMV spreads over every core
    itself, and ~500 tiny torch ops, for which torch's thread pool only adds hand-off latency and
    competes with the GEMV's threads for the cores.
    """
    if device.type != "cpu" or not gemv_enabled():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def generate(
    model,
    input_ids: Sequence[int] | torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    streamer: Callable[[int], None] | None = None,
    **settings,
) -> list[int]:
    """Continue one prompt; return the new token ids (a final stop token is not included).

    Args:
        model: a :class:`tunex.models.CausalLM` (or anything with ``new_cache`` and the same call).
        input_ids: the prompt ids (list or 1-D tensor).
        config: a :class:`GenerationConfig`; keyword ``settings`` override its fields.
        tokenizer: needed only for ``stop_words``.
        streamer: called with each new token id as soon as it is chosen.
    """
    cfg = GenerationConfig(**{**(config.__dict__ if config else {}), **settings})
    cfg.check()
    if cfg.stop_words and tokenizer is None:
        raise ValueError("stop_words need a tokenizer to decode the generated text")
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("generate: the prompt is empty")
    device = next(model.parameters()).device
    ids = ids.to(device)
    gen = None
    if cfg.temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    stop_ids = set(int(i) for i in cfg.stop_token_ids)
    cache = model.new_cache(1, ids.numel() + cfg.max_new_tokens)
    logits = model(ids[None], cache=cache, last_only=True)[0, -1].float()  # (V,)
    seen, out = ids, []
    with decode_threads(device), registry.pinned():  # each token asks the registry the same questions
        for step in range(cfg.max_new_tokens):
            scores = process_logits(logits.clone(), seen, cfg)
            if cfg.temperature == 0:
                token = scores.argmax()
            else:
                token = torch.multinomial(scores.softmax(-1), 1, generator=gen)[0]
            t = int(token)
            if t in stop_ids:
                break
            out.append(t)
            if streamer is not None:
                streamer(t)
            if cfg.stop_words and _ends_with_stop_word(tokenizer, out, cfg.stop_words):
                break
            if step + 1 == cfg.max_new_tokens:
                break
            seen = torch.cat((seen, token.view(1)))
            logits = model(token.view(1, 1), cache=cache, last_only=True)[0, -1].float()
    return out


def _ends_with_stop_word(tokenizer, ids: list[int], words: Sequence[str]) -> bool:
    tail = tokenizer.decode(ids[-16:], skip_special_tokens=False)
    return any(w and w in tail for w in words)


def stop_settings(tokenizer, words: Sequence[str], eos_ids: Sequence[int] = ()) -> tuple[list[int], list[str]]:
    """Split stop words into token ids and strings checked on the text.

    A word is an id only when it is one special token (such as ``<|im_end|>``), which the reply's
    text never shows. Any other word is matched on the text, however the reply spells it: "France"
    is one token alone, but a reply spells " France" with another."""
    ids, texts = list(eos_ids), []
    for w in words:
        enc = tokenizer.encode(w, add_special_tokens=False)
        special = (
            len(enc) == 1
            and tokenizer.decode(enc, skip_special_tokens=False) == w
            and not tokenizer.decode(enc, skip_special_tokens=True)
        )
        if special:
            ids.append(enc[0])
        else:
            texts.append(w)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids)), texts


def generate_text(
    model,
    tokenizer,
    prompt: str,
    config: GenerationConfig | None = None,
    *,
    streamer: Callable[[str], None] | None = None,
    **settings,
) -> str:
    """Generate from a rendered prompt string; return the reply text without stop words."""
    cfg = GenerationConfig(**{**(config.__dict__ if config else {}), **settings})
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    return generate_reply(model, tokenizer, prompt_ids, cfg, model.config.eos_token_ids, streamer=streamer)


def generate_reply(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    cfg: GenerationConfig,
    eos_ids: Sequence[int],
    *,
    streamer: Callable[[str], None] | None = None,
) -> str:
    """Generate after ``prompt_ids``, stopping at ``cfg``'s stop ids and words, ``eos_ids`` and the
    tokenizer's eos; stream the text pieces to ``streamer``; return the reply without stop words.
    Writes the split stop settings into ``cfg`` (callers pass their own copy)."""
    from tunex.tokenizer import StreamDecoder

    ids, words = stop_settings(tokenizer, cfg.stop_words, list(cfg.stop_token_ids) + list(eos_ids))
    cfg.stop_token_ids, cfg.stop_words = ids, words
    decoder = StreamDecoder(tokenizer)
    emit = None
    if streamer is not None:

        def emit(token: int) -> None:
            piece = decoder.push(token)
            if piece:
                streamer(piece)

    new = generate(model, prompt_ids, cfg, tokenizer=tokenizer, streamer=emit)
    text = tokenizer.decode(new, skip_special_tokens=True)
    for w in words:
        cut = text.find(w)
        if cut >= 0:
            text = text[:cut]
    return text
