"""Configuration of a Skywork-R1V chat model (InternVL-chat layout, `model_type: skywork_chat`).

Written for r1v-quant; shipped inside the checkpoints r1v-quant writes, next to
`configuration_skywork_vit.py`, and named by config.json's
`"auto_map": {"AutoConfig": "configuration_skywork_chat.SkyworkChatConfig"}`, so that
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` and vLLM (whose registered
`SkyworkR1VChatModel` reads this config) can load the checkpoint. Settings only, no model
code; works with transformers 4.x and 5.x. r1v-quant's own loader reads config.json
directly and never imports this file.

What vLLM's `skyworkr1v` reads from it: `vision_config` (see configuration_skywork_vit),
`llm_config` (vLLM aliases it to `text_config`; it must be a real transformers config of
the language model, whose `architectures` vLLM resolves, e.g. Qwen2ForCausalLM),
`select_layer`, `force_image_size`, `downsample_ratio`, `ps_version`,
`dynamic_image_size`, `use_thumbnail`, `min_dynamic_patch`, `max_dynamic_patch`, and a
top-level `quantization_config` when the checkpoint is quantised (kept as given).
Defaults for absent keys are those of r1v-quant's own loader, so both read a file alike.
"""

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_skywork_vit import SkyworkVisionConfig

_TOP_DEFAULTS = {
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "select_layer": -1,
    "force_image_size": None,
    "downsample_ratio": 0.5,
    "template": None,
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "ps_version": "v1",
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
}

# Language-model architectures a Skywork/InternVL-chat checkpoint may name, by model_type.
_ARCH_TO_MODEL_TYPE = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
}


def _vision_config(value):
    if isinstance(value, SkyworkVisionConfig):
        return value
    if isinstance(value, PretrainedConfig):
        value = value.to_dict()
    return SkyworkVisionConfig(**dict(value or {}))


def _llm_config(value):
    if isinstance(value, PretrainedConfig):
        return value
    settings = dict(value or {})
    model_type = settings.pop("model_type", None)
    if model_type is None:
        arch = (settings.get("architectures") or ["Qwen2ForCausalLM"])[0]
        model_type = _ARCH_TO_MODEL_TYPE.get(arch, "qwen2")
    if "architectures" not in settings:
        settings["architectures"] = ["Qwen2ForCausalLM"] if model_type == "qwen2" else None
    return CONFIG_MAPPING[model_type](**settings)


class SkyworkChatConfig(PretrainedConfig):
    """Top-level config of a Skywork-R1V checkpoint: vision encoder + projector + language model."""

    model_type = "skywork_chat"
    is_composition = True
    sub_configs = {"vision_config": SkyworkVisionConfig, "llm_config": PretrainedConfig}

    def __init__(self, vision_config=None, llm_config=None, **kwargs):
        kwargs.pop("model_type", None)
        kwargs.pop("text_config", None)  # an alias of llm_config, never stored twice
        own = {key: kwargs.pop(key, default) for key, default in _TOP_DEFAULTS.items()}
        super().__init__(**kwargs)
        self.vision_config = _vision_config(vision_config)
        self.llm_config = _llm_config(llm_config)
        for key, value in own.items():
            setattr(self, key, value)

    # transformers' `get_text_config()` looks for `text_config`: expose the language model
    # under that name too, without storing (or serialising) it twice.
    @property
    def text_config(self):
        return self.llm_config

    @text_config.setter
    def text_config(self, value):
        self.llm_config = _llm_config(value)
