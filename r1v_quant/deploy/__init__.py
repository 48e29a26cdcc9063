"""Deployment: memory plans for GPUs, the export check against vLLM's contract, and serving with vLLM."""
