"""The Qwen2 decoder layer's topology for AWQ, named once as data.

Each `ScaleGroup` is one scale search: linears that read the same input, the operation before
them that absorbs the inverse scales, and the block whose output the search protects. Module
paths of `QWEN2_GROUPS` are relative to a `Qwen2DecoderLayer`; those of `FINAL_GROUP` (the
optional search after the last decoder layer) to the language model, `Qwen2ForCausalLM`, whose
checkpoint names sit under `LANGUAGE_MODEL`. The pipeline, the checkpoint layout and the export
inspector all read their linear names from here. Plain data with no imports, so that the model
layer can read it without depending on the quantisation code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleGroup:
    name: str                  # the key of the group's alpha in reports
    prev: str                  # the op whose outputs are divided by the scales (a norm or a linear)
    linears: tuple[str, ...]   # the linears whose input channels are multiplied by the scales
    block: str                 # the module whose output the search keeps close to float
    mixes_tokens: bool         # the block mixes tokens (attention), so it must see whole samples
    clip: tuple[str, ...]      # the linears whose weight range the clip search may shrink

    @property
    def reads(self) -> str:
        """The captured input the group is searched on: the input of its first linear."""
        return self.linears[0]


# Softmax amplifies errors of q and k, so AWQ leaves their range alone (no clip for them).
QWEN2_GROUPS: tuple[ScaleGroup, ...] = (
    ScaleGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "self_attn", True, ("self_attn.v_proj",)),
    ScaleGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", False, ("self_attn.o_proj",)),
    ScaleGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", False,
               ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", False, ("mlp.down_proj",)),
)

# Every quantised linear of a decoder layer, in the order the checkpoint and the export list them.
QUANT_LINEARS: tuple[str, ...] = tuple(name for g in QWEN2_GROUPS for name in g.linears)
# The linears vLLM fuses into one (q/k/v -> qkv_proj, gate/up -> gate_up_proj), by fused name.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                             "gate_up_proj": ("gate_proj", "up_proj")}
# The linears that carry a bias in Qwen2.
BIASED_LINEARS: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
NORMS: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")

# lm_head reads the final norm's output; the norm absorbs its scales. The protected block is lm_head
# itself (the logits), so its objective needs no stored float target (see quant/head.py).
FINAL_GROUP = ScaleGroup("lm_head", "model.norm", ("lm_head",), "lm_head", False, ("lm_head",))
LANGUAGE_MODEL = "language_model."
# Where the decoder layers' tensors sit in the checkpoint: DECODER_LAYERS + "<index>.<module>".
DECODER_LAYERS = LANGUAGE_MODEL + "model.layers."

