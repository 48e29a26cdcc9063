"""TEST-ONLY stand-in for `torchvision`, used solely by tests/vllm_check.py inside `.venv-vllm`.

vLLM's InternVL/Skywork-R1V image processor (vllm/transformers_utils/processors/internvl.py)
does `import torchvision.transforms as T` at import time, so vLLM cannot even resolve the
`SkyworkR1VChatModel` architecture without it. On these CPU-only machines the real
torchvision wheel does not import beside the CPU build of torch ("operator torchvision::nms
does not exist"), so the vLLM check puts this folder first on `sys.path`. It provides only
the five transforms that processor uses (Compose, Lambda, Resize with bicubic
interpolation, ToTensor, Normalize) for PIL images, with torchvision's semantics; nothing
else of torchvision exists here. It is never installed and never used by r1v-quant itself.
"""

__version__ = "0.0.0+r1v-quant-test-stub"
