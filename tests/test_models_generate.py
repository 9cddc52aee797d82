"""Logit processing against transformers' processors; stop handling of generate."""

from __future__ import annotations

import pytest
import torch
from tunex.models.generate import GenerationConfig, process_logits


@pytest.mark.parametrize(
    "penalty,temp,k,p", [(1.3, 0.7, 0, 1.0), (1.0, 1.5, 20, 1.0), (0.8, 1.0, 0, 0.6), (1.2, 0.5, 50, 0.9)]
)
def test_processors_match_transformers(penalty, temp, k, p):
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=g) * 4
    seen = torch.randint(0, 500, (40,), generator=g)
    expected = logits[None].clone()
    procs = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temp)]
    procs += [TopKLogitsWarper(k)] if k else []
    procs += [TopPLogitsWarper(p)] if p < 1 else []
    for proc in procs:
        expected = proc(seen[None], expected)
    got = process_logits(
        logits.clone(), seen, GenerationConfig(temperature=temp, top_k=k, top_p=p, repetition_penalty=penalty)
    )
    torch.testing.assert_close(got, expected[0])


def test_bad_settings_are_rejected():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationConfig(**bad).check()
