"""The checkpoint and its runtime: finding and reading it, its config, tensor layout and sizes, the vision
encoder, projector and language model, prompts and generation."""
