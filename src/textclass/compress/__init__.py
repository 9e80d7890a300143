"""Compression of trained runs: structured pruning (`prune`), later distillation. Each takes run directories
and writes a new one; imports point down (models, training, evaluation), never up."""
