"""Training on several processes and nodes with torch.distributed (launched by torchrun).

env      rank / world size from torchrun's environment, backend, process group, timeouts
launch   ``tunex train --nproc-per-node N`` re-executes itself under torch.distributed.run
sampler  each rank's slice of every global batch, resumable by global step
sequence sequence parallelism (Ulysses): each sequence split over a group of ranks
wrap     the loss module; DDP over adapters, FSDP2 shards for full fine-tunes
ckpt     sharded checkpoints (torch.distributed.checkpoint), resume on another world size
metrics  loss and tokens aggregated across ranks
"""
