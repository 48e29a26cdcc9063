"""Random checkpoints with the real Skywork-R1V layout: `make-tiny`'s builder, its small tokenizer,
and slices at the 38B model's widths, for trying the tool offline."""
