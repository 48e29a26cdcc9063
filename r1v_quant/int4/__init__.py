"""The AutoAWQ GEMM int4 format and PyTorch's int4 kernel layouts: below both the model and quantisation code."""
