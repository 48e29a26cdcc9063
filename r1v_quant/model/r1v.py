"""Skywork-R1V: vision encoder -> mlp1 -> transformers' Qwen2ForCausalLM, loaded by the checkpoint's names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2ForCausalLM

from r1v_quant.errors import UserError
from r1v_quant.int4.format import head_is_tied, read_quantization_config
from r1v_quant.int4.linear import swap_to_empty_awq
from r1v_quant.model.checkpoint import Checkpoint, resolve_model
from r1v_quant.model.config import R1VConfig, load_config
from r1v_quant.model.layout import HEAD_MODULE, check_checkpoint_shapes, llm_linear_shapes
from r1v_quant.model.projector import make_projector, tokens_from_patches
from r1v_quant.model.prompt import IMG_CONTEXT, merge_image_embeddings
from r1v_quant.model.vision import VisionModel


class R1VModel(nn.Module):
    def __init__(self, cfg: R1VConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.mlp1 = make_projector(cfg.vision.hidden_size, cfg.hidden_size, cfg.downsample_ratio)
        qcfg = cfg.qwen2_config()
        qcfg._attn_implementation = "sdpa"
        self.language_model = Qwen2ForCausalLM(qcfg)
        self.img_context_id: int | None = None

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles, num_image_token, 4 * vision width]: the pixel-shuffled
        encoder output that mlp1 projects."""
        hidden = self.vision_model(pixel_values, self.cfg.select_layer)[:, 1:, :]
        return tokens_from_patches(hidden, self.cfg.downsample_ratio, self.cfg.ps_version)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles * num_image_token, llm_width] visual tokens, in tile order."""
        projected = self.mlp1(self.vision_tokens(pixel_values).to(self.mlp1[1].weight.dtype))
        return projected.reshape(-1, projected.shape[-1])

    def input_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None or pixel_values.numel() == 0:
            return embeds
        if self.img_context_id is None:
            raise RuntimeError("img_context_id is unset; load the model with load_model() or set it from the tokenizer")
        feats = self.image_features(pixel_values.to(embeds.device)).to(embeds.dtype)
        return merge_image_embeddings(embeds, input_ids, feats, self.img_context_id)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kwargs):
        embeds = self.input_embeddings(input_ids, pixel_values)
        return self.language_model(inputs_embeds=embeds, **kwargs)


@dataclass
class Loaded:
    model: R1VModel
    config: R1VConfig
    tokenizer: object
    path: Path
    device: torch.device
    dtype: torch.dtype


def pick_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} was asked for but no CUDA GPU is visible.")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise UserError(f"--dtype {name} is not one of bf16, fp16, fp32.")
    return table[name]


def build_empty(cfg: R1VConfig) -> R1VModel:
    """The module tree on the meta device: shapes and names only, no memory."""
    with torch.device("meta"):
        model = R1VModel(cfg)
    if cfg.quantization is not None:
        swap_quantized(model, cfg)
    return model


def swap_quantized(model: R1VModel, cfg: R1VConfig) -> None:
    """Give an export's quantised linears their AWQ form before its tensors are assigned
    (lm_head too when quantization_config says `"lm_head": true`). Decoder linears that
    `modules_to_not_convert` keeps (model/kept.py, vLLM's rule) stay nn.Linear."""
    from r1v_quant.model.kept import kept_groups, kept_linears

    qc = read_quantization_config(cfg.quantization)
    qc.check_loadable("config.json")
    kept_groups(cfg.num_layers, qc.modules_to_not_convert)  # a fused group kept in part is refused, as vLLM does
    kept = kept_linears(cfg.num_layers, qc.modules_to_not_convert)
    names = [n for i in range(cfg.num_layers) for n in llm_linear_shapes(cfg, i) if n not in kept]
    if qc.lm_head:
        if head_is_tied(cfg.llm):
            raise UserError("config.json says lm_head is quantised but also ties it to embed_tokens "
                            "(tie_word_embeddings), which a 4-bit lm_head cannot be.")
        names.append(HEAD_MODULE)
    swap_to_empty_awq(model, names, qc.group_size)


def load_front(cfg: R1VConfig, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> R1VModel:
    """Only what builds the language model's input embeddings: vision encoder, mlp1, embed_tokens."""
    model = build_empty(cfg)
    for name in ckpt.names():
        if name.startswith(("vision_model.", "mlp1.", "language_model.model.embed_tokens.")):
            tensor = ckpt.get(name)
            assign_tensor(model, name, tensor.to(device=device, dtype=dtype))
    return model.eval().requires_grad_(False)


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(name)


def _target_dtype(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> torch.dtype:
    # Quantised tensors keep their stored types: int32 codes, and fp16 scales the kernels convert themselves.
    if not tensor.is_floating_point() or name.endswith((".scales",)):
        return tensor.dtype
    return dtype


def load_weights(model: R1VModel, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    tied = head_is_tied(model.cfg.llm)
    if tied:
        expected.pop("language_model.lm_head.weight", None)
    unexpected = [n for n in ckpt.names() if n not in expected]
    missing = [n for n in expected if n not in ckpt.shard_of]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (first: {unexpected[0]})")
        raise UserError(f"{ckpt.dir} does not match its config.json: {'; '.join(parts)}.")
    for name in ckpt.names():
        shape = ckpt.shape_of(name)
        if shape != expected[name]:
            raise UserError(f"{ckpt.dir}: tensor {name} has shape {list(shape)}, the config implies {list(expected[name])}.")
        tensor = ckpt.get(name)
        assign_tensor(model, name, tensor.to(device=device, dtype=_target_dtype(tensor, name, dtype)))
        del tensor
    if tied:
        model.language_model.tie_weights()


def rotary_embedding(qwen2_config, device: torch.device):
    """Rotary frequencies are computed, not stored, so they are rebuilt on the target device."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    with torch.device(device):
        return Qwen2RotaryEmbedding(qwen2_config)


def _refresh_rotary(model: R1VModel, device: torch.device) -> None:
    model.language_model.model.rotary_emb = rotary_embedding(model.language_model.config, device)


def load_model(spec, device: str | None = None, dtype: str | torch.dtype = "bf16", with_tokenizer: bool = True) -> Loaded:
    path = resolve_model(spec)
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    check_checkpoint_shapes(cfg, ckpt)
    dev = pick_device(device)
    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    model = build_empty(cfg)
    load_weights(model, ckpt, dev, dt)
    _refresh_rotary(model, dev)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    if tokenizer is not None:
        model.img_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    return Loaded(model, cfg, tokenizer, path, dev, dt)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Our own loader never runs the checkpoint's remote code; transformers would ask, then warn about
    # the unfamiliar model type, neither of which concerns the tokenizer.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - many tokenizer formats, one message
        raise UserError(f"{path} has no tokenizer that transformers can load ({type(e).__name__}).") from None
    finally:
        hf_logging.set_verbosity(level)
    if tok.convert_tokens_to_ids(IMG_CONTEXT) in (None, tok.unk_token_id):
        raise UserError(f"the tokenizer in {path} lacks the {IMG_CONTEXT} token that images need.")
    return tok
