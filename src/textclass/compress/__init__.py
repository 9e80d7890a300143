"""Making trained models smaller and faster: distillation (distill.py) and structured pruning (prune.py)."""
