"""Training code that both loops share: the run lifecycle, loss, optimizers, checkpoints, parallelism, safety."""
