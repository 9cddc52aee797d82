"""The training loop and its parts: loss, optimizer/schedule, checkpoints, metrics, eval hook."""
