"""Fitting a model: the options, the training step and epoch, the optimiser and schedule, checkpoints to resume."""
