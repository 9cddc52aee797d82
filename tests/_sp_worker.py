"""A torchrun worker for tests/test_sequence_parallel.py, and the pieces the test's one-process
oracle shares with it (the model with its LoRA init, the packed batches).

``python -m torch.distributed.run --nproc-per-node N tests/_sp_worker.py MODEL OUT SP CHECKPOINTING``:
every rank trains one micro-batch per data-parallel group through DDP and the sequence-parallel
loss module, as the training loop does (the loss token-weighted over all groups' targets, backward
times the world size); rank 0 saves the job's loss and the LoRA gradients to OUT.
"""

from __future__ import annotations

import sys

import torch

# documents of two packed rows (lengths sum to T = 37, an odd length: the ranks pad it), with cuts
# that fall inside documents and a document of length 1
LENGTHS = ([5, 1, 14, 9, 8], [20, 17])
T = 37


def lora_model(folder, seed: int = 3):
    """The tiny model with LoRA on every linear, the adapters set to seeded random values."""
    from tunex.models import load_model
    from tunex.peft import apply_lora

    model = load_model(folder)
    apply_lora(model, "all-linear", 4, 8.0, 0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def batch(index: int, vocab: int) -> dict[str, torch.Tensor]:
    """Data-parallel group ``index``'s packed micro-batch (2 rows of T tokens)."""
    g = torch.Generator().manual_seed(100 + index)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    labels = ids.clone()
    labels[:, ::7] = -100  # some positions without a target
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    labels[pos == 0] = -100  # no document's first token is a target (as the packer makes them)
    labels[1, 30 : 30 + 4 * index] = -100  # the groups' target counts differ: the loss weighs tokens, not batches
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def main(model_dir: str, out: str, size: int, checkpointing: bool) -> None:
    from tunex.dist.env import init_distributed
    from tunex.dist.metrics import step_targets
    from tunex.dist.sequence import plan
    from tunex.dist.wrap import wrap_for_training

    torch.set_num_threads(1)
    env = init_distributed(use_cuda=False)
    group = plan(env, size)
    model = lora_model(model_dir)
    model.gradient_checkpointing = checkpointing
    step = wrap_for_training(model, "lora", env, torch.device("cpu"), "float32", sequence=group)
    b = batch(group.dp_rank, model.config.vocab_size)
    # as the loop: the global batch's target count (each group's once), backward times the world size
    denom = step_targets(env, [b["labels"]] if group.rank == 0 else [], torch.device("cpu"))
    loss = step(b["input_ids"], b["labels"], b["position_ids"], denom)
    (loss * env.world_size).backward()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if env.rank == 0:
        torch.save({"loss": float(total), "grads": grads}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
