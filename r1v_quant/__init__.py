"""r1v-quant: AWQ 4-bit quantization of Skywork-R1V vision-language models."""

__version__ = "0.1.0"
