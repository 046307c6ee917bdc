"""Continual-learning engine: task losses, evaluation and the training loop."""
