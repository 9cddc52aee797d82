"""Importance matrices for GGUF quantization: the mean square of each input column of every 2-D
weight's product, collected by running the model over calibration text (what llama.cpp's
``llama-imatrix`` collects). ``hf_to_gguf(..., calibration=FILE)`` passes them to the packing's
weighted block search (llama.cpp's search when it quantizes with an importance matrix), which
spends the levels where the columns that carry large activations need them.

The text should be like what the model will see and must not be the text a perplexity is
measured on. The statistics are per GGUF tensor name; a tensor without one (the MoE experts, the
token embedding of an untied model, which is a lookup) is packed unweighted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunex.errors import FormatError

# tokens per forward pass and the default total
CALIBRATION_CTX = 512
CALIBRATION_TOKENS = 16384


def read_calibration_text(path: str | Path) -> str:
    """The text of a calibration file: UTF-8 plain text. Missing, empty or binary: a one-line
    FormatError / FileNotFoundError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"calibration file {file} does not exist; pass a UTF-8 text file")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(
            f"calibration file {file} is not UTF-8 text (byte {e.start}); pass plain text such as the fine-tune's data"
        ) from None
    if "\x00" in text:
        raise FormatError(f"calibration file {file} holds NUL bytes (a binary file?); pass plain UTF-8 text")
    if not text.strip():
        raise FormatError(
            f"calibration file {file} is empty; pass some text the model will see (a few thousand tokens)"
        )
    return text


class _Collector:
    """A runtime (tunex.runtime's Plain: the model's math in torch ops) that adds up the squares of
    each projection's input columns, per GGUF tensor name."""

    def __init__(self, names: dict[int, str]):
        from tunex.runtime.compose import Plain

        self._plain = Plain()
        self.names = names
        self.sums: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self._plain, name)

    def run_layers(self, model, x, cos, sin, mask, cache):
        for layer in model.layers:
            x = layer(x, cos, sin, mask, cache, rt=self)
        return x

    def project(self, modules, x, rebuild=None, kept=None):
        import torch

        flat = x.detach().reshape(-1, x.shape[-1]).double()
        squares = None
        for m in modules:
            name = self.names.get(id(m))
            if name is None:
                continue
            if squares is None:
                squares = torch.einsum("ij,ij->j", flat, flat).numpy()
            self.sums[name] = self.sums.get(name, 0.0) + squares
            self.rows[name] = self.rows.get(name, 0) + flat.shape[0]
        return [m(x) for m in modules]


def calibration_model(model_dir: str | Path, text_file: str | Path, tokens: int = CALIBRATION_TOKENS):
    """(model in float32, eval mode; the first ``tokens`` token ids of ``text_file``; {id of each
    2-D weight's module: its GGUF tensor name}) for a calibration run."""
    from torch import nn

    from tunex.gguf_io import ARCH_OF_FAMILY, gguf_name
    from tunex.models import load_model
    from tunex.models.hub import resolve_model_path
    from tunex.tokenizer import load_tokenizer

    text = read_calibration_text(text_file)
    folder = resolve_model_path(model_dir)
    ids = load_tokenizer(folder).encode(text, add_special_tokens=False)[:tokens]
    if len(ids) < 2:
        raise FormatError(f"calibration file {text_file} gives {len(ids)} token(s); pass at least a paragraph of text")
    model = load_model(folder).eval()
    arch = ARCH_OF_FAMILY.get(model.config.family, "llama")
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            try:
                names[id(module)] = gguf_name(f"{name}.weight", arch)
            except KeyError:  # a module GGUF names otherwise (experts, routers): packed unweighted
                continue
    names[id(model.lm_head)] = "token_embd.weight" if model.config.tie_word_embeddings else "output.weight"
    return model, ids, names


def collect_imatrix(
    model_dir: str | Path, text_file: str | Path, tokens: int = CALIBRATION_TOKENS, ctx: int = CALIBRATION_CTX
) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 mean square of each input column} of the model's 2-D weights over
    the first ``tokens`` tokens of ``text_file``, run in windows of ``ctx`` tokens."""
    import torch

    model, ids, names = calibration_model(model_dir, text_file, tokens)
    collector = _Collector(names)
    decoder = model.model
    saved, decoder.runtime = decoder.runtime, collector
    try:
        with torch.no_grad():
            for start in range(0, len(ids), ctx):
                window = ids[start : start + ctx]
                model(torch.tensor([window]))
    finally:
        decoder.runtime = saved
    return {name: (s / collector.rows[name]).astype(np.float32) for name, s in collector.sums.items()}
