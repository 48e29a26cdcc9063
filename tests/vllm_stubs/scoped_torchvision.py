"""TEST-ONLY: make vLLM's InternVL image processor importable without torchvision (see standin/torchvision/__init__.py).

The stand-in must be visible to exactly one import, `vllm.transformers_utils.processors.internvl`:
transformers decides whether torchvision exists with `importlib.util.find_spec("torchvision")`
and, when it believes so, imports `torchvision.io` and more, which the stand-in does not have.
So `import_internvl_processor()` first imports everything else that module needs, then puts
the stand-in on `sys.path` for that one import only, and removes it (from `sys.path` and
`sys.modules`) again; the processor module keeps its reference to the stand-in transforms.

vLLM inspects model classes in a fresh Python process (`registry._SUBPROCESS_COMMAND`, which
vLLM documents as the variable to change when that process needs a different start);
`use_in_registry_subprocess()` points it at this file, whose `__main__` does the same set-up
before running vLLM's own inspection entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

STUB_ROOT = str(Path(__file__).resolve().parent / "standin")
PROCESSOR_MODULE = "vllm.transformers_utils.processors.internvl"


def _drop_stub_modules() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_internvl_processor():
    """Import (once) and return vLLM's InternVL processor module, backed by the torchvision stand-in."""
    if PROCESSOR_MODULE in sys.modules:
        return sys.modules[PROCESSOR_MODULE]
    # Everything the processor module imports except torchvision, imported while torchvision
    # is still absent, so transformers settles its own torchvision checks first.
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.image_processing_base  # noqa: F401
    import transformers.image_utils  # noqa: F401
    import transformers.processing_utils  # noqa: F401
    import transformers.video_processing_utils  # noqa: F401
    import vllm.multimodal.image  # noqa: F401
    import vllm.multimodal.processing  # noqa: F401
    import vllm.tokenizers.hf  # noqa: F401
    import vllm.transformers_utils.processors  # noqa: F401
    from transformers import BaseVideoProcessor, BatchFeature, ImageProcessingMixin, TensorType  # noqa: F401

    sys.path.insert(0, STUB_ROOT)
    try:
        import importlib

        return importlib.import_module(PROCESSOR_MODULE)
    finally:
        sys.path.remove(STUB_ROOT)
        _drop_stub_modules()


def use_in_registry_subprocess() -> None:
    """Make vLLM's model-inspection subprocess start through this file."""
    from vllm.model_executor.models import registry

    registry._SUBPROCESS_COMMAND = [sys.executable, str(Path(__file__).resolve())]


def install() -> None:
    """Both of the above: call before creating `vllm.LLM`."""
    import_internvl_processor()
    use_in_registry_subprocess()


if __name__ == "__main__":
    # Started by vLLM's registry in place of `python -m vllm.model_executor.models.registry`.
    import_internvl_processor()
    from vllm.model_executor.models.registry import _run

    _run()
