"""The distributed training loop on Megatron-Core pieces: arguments, optimizer, checkpoints, metrics, loop."""
