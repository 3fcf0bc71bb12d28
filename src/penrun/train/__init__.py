"""Training: the epoch loop, optimizers, checkpoints, run folders, several processes."""
