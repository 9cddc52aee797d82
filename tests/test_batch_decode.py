"""Several sequences decoded in one step (continuous batching, tunex serve): every row's bits are
exactly those it gets decoded alone, through the one-row path that `generate` runs (the oracle)."""

from __future__ import annotations

import pytest
import torch
from test_kernels_gemv import tiny_model as gemv_tiny_model
from tunex import _native
from tunex.kernels import gemv
from tunex.models.decoder import CausalLM, RowCaches
from tunex.models.generate import decode_threads

pytestmark = pytest.mark.skipif(not gemv.rows_supported(), reason="the built extension lacks gemv_rows_f32")


def tiny_model(**extra) -> CausalLM:
    """test_kernels_gemv's tiny llama, with widths that are multiples of 32 (batched decoding needs them)."""
    return gemv_tiny_model(**{"vocab_size": 320, "intermediate_size": 192, "max_position_embeddings": 256, **extra})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("rows,cols,n", [(7, 33, 3), (576, 576, 16), (4099, 513, 5), (300, 96, 2), (64, 1, 4)])
def test_rows_of_a_product_are_each_rows_own_gemv(rows, cols, n):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(rows, cols, generator=g), torch.randn(rows, generator=g)
    x = torch.randn(n, 1, cols, generator=g)
    with torch.inference_mode():
        alone = [gemv.linear(x[i : i + 1], w, b) for i in range(n)]
        with gemv.token_rows():
            assert gemv.gemv_applies(x, w)
            together = gemv.linear(x, w, b)
    assert together.shape == (n, 1, rows)
    for i in range(n):
        assert torch.equal(_bits(together[i : i + 1]), _bits(alone[i])), i


def test_outside_token_rows_several_rows_are_not_the_gemv():
    w, x = torch.randn(64, 32), torch.randn(3, 1, 32)
    with torch.inference_mode():
        assert not gemv.gemv_applies(x, w)
        with gemv.token_rows():
            assert gemv.gemv_applies(x, w)
        assert not gemv.gemv_applies(x, w)


def test_bad_row_counts_are_one_line_errors():
    x, w, out = torch.zeros(10).numpy(), torch.zeros(15).numpy(), torch.zeros(6).numpy()
    with pytest.raises(ValueError, match="does not hold 4 whole rows"):
        _native.gemv_rows_f32(x, 4, [(w, None, out)])
    with pytest.raises(ValueError, match="expected 2 x 5"):
        _native.gemv_rows_f32(x, 2, [(w, None, torch.zeros(4).numpy())])
    with pytest.raises(ValueError, match="output 0 has 5 values"):
        _native.gemv_rows_f32(x, 2, [(w, None, torch.zeros(5).numpy())])


VARIANTS = {
    "llama": {},
    "qwen2-bias": dict(model_type="qwen2", attention_bias=True),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
    "dynamic-rope": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batched_step_gives_each_row_its_logits_alone(variant):
    """Sequences at different positions (prompts of 3..11 tokens, one joining late) decoded
    together: each step's logits equal, bit for bit, the sequence's own one-row decode."""
    model = tiny_model(**VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=g) for n in (3, 11, 7, 4)]
    steps = 8
    with torch.inference_mode():

        def start(ids):
            cache = model.new_cache(1, ids.numel() + steps)
            return cache, model(ids[None], cache=cache, last_only=True)[0, -1]

        alone = []  # per sequence: the logits of each step, decoding alone
        for ids in prompts:
            cache, logits = start(ids)
            seq = [logits]
            with decode_threads(logits.device):
                for _ in range(steps):
                    token = seq[-1].argmax()
                    seq.append(model(token.view(1, 1), cache=cache, last_only=True)[0, -1])
            alone.append(seq)
        running = [(i, *start(ids)) for i, ids in enumerate(prompts[:3])]
        made = {i: [logits] for i, _, logits in running}
        for step in range(steps):
            if step == 2:  # the fourth sequence joins between steps
                running.append((3, *start(prompts[3])))
                made[3] = [running[-1][2]]
            tokens = torch.stack([made[i][-1].argmax() for i, _, _ in running]).view(-1, 1)
            with decode_threads(tokens.device), gemv.token_rows():
                logits = model(tokens, cache=RowCaches([c for _, c, _ in running]), last_only=True)[:, -1]
            for row, (i, _, _) in enumerate(running):
                made[i].append(logits[row])
    for i, seq in made.items():
        for step, got in enumerate(seq):
            assert torch.equal(_bits(got), _bits(alone[i][step])), (variant, i, step)
