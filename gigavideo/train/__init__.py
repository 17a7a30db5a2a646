"""Stage 4: the loss, the data, the loop's parts, DeepSpeed configs, checkpoints and validation."""
