"""Compression of trained runs: distillation (`distill`: teachers -> a student) and structured pruning
(`prune`). Each takes run directories and writes a new one; imports point down (models, training,
evaluation), never up."""
