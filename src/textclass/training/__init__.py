"""Training on the Hugging Face Trainer: losses, the Trainer subclass and the run orchestration."""
