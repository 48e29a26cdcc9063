"""Configuration of the Skywork-R1V vision encoder (an InternViT-style ViT).

Written for r1v-quant; shipped inside the checkpoints r1v-quant writes (small test
checkpoints and exports) so that loaders that need `trust_remote_code` to read a
`skywork_chat` config.json (transformers `AutoConfig`, vLLM) can do so. It holds settings
only: no model code. It imports nothing but transformers and works with transformers
4.x and 5.x (where configs are dataclasses that still accept a custom `__init__`).

Fields and their meaning (also read by vLLM's InternVisionModel):
hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_channels,
image_size, patch_size, qkv_bias, qk_normalization (RMS-normalise q and k over the full
width), norm_type ("rms_norm" or "layer_norm"), layer_norm_eps, hidden_act,
initializer_factor (layer-scale init), initializer_range, dropout, attention_dropout,
drop_path_rate, use_flash_attn.
"""

from transformers import PretrainedConfig

# Settings of the published 6B encoder; a config.json normally spells every one out.
_VISION_DEFAULTS = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 448,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 45,
    "use_flash_attn": False,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
}


class SkyworkVisionConfig(PretrainedConfig):
    """Vision-encoder settings of a Skywork-R1V checkpoint (`vision_config` in config.json)."""

    model_type = "intern_vit_6b"

    def __init__(self, **kwargs):
        # A nested dict may carry its own model_type; the class attribute is the one kept.
        kwargs.pop("model_type", None)
        own = {key: kwargs.pop(key, default) for key, default in _VISION_DEFAULTS.items()}
        super().__init__(**kwargs)
        for key, value in own.items():
            setattr(self, key, value)
