"""What the tests and the training scripts share: the trained small checkpoints (r1v-mini and
r1v-outliers), their training code, an MMMU-schema data set and the vLLM CPU reference op."""
