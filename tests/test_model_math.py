"""The model against deliberately plain second computations: vision features, pixel shuffle, logits."""

import math

import torch
import torch.nn.functional as F

from r1v_quant.model.config import parse_config
from r1v_quant.model.layout import checkpoint_shapes
from r1v_quant.model.projector import pixel_shuffle
from r1v_quant.model.r1v import R1VModel, _refresh_rotary, assign_tensor
from r1v_quant.synthetic.checkpoint import TinySizes, init_tensor, tiny_config

SPECIAL = {"bos": 1, "eos": 2, "pad": 2}


def small_model(ps_version="v2", norm_type="rms_norm", qk=True, seed=0):
    raw = tiny_config(256, TinySizes(llm_layers=2), SPECIAL)
    raw["ps_version"] = ps_version
    raw["vision_config"].update(norm_type=norm_type, qk_normalization=qk, qkv_bias=norm_type == "layer_norm")
    cfg = parse_config(raw)
    with torch.device("meta"):
        model = R1VModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in checkpoint_shapes(cfg).items():
        t = init_tensor(name, shape, gen, TinySizes())
        if name.endswith(".weight") and t.dim() == 1:
            t = t + 0.1 * torch.randn(shape, generator=gen)  # non-trivial norm weights
        if name.endswith(".bias") and "norm" in name:
            t = 0.1 * torch.randn(shape, generator=gen)
        sd[name] = t.float()
        assign_tensor(model, name, sd[name])
    _refresh_rotary(model, torch.device("cpu"))
    model.img_context_id = 7
    return model.eval(), cfg, sd


def plain_norm(x, w, b, eps, kind):
    if kind == "rms_norm":
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return w * (x - mu) / torch.sqrt(var + eps) + b


def plain_vision(sd, cfg, pixels):
    v = cfg.vision
    p = v.patch_size
    n = pixels.shape[0]
    g = pixels.shape[-1] // p
    # Patch embedding as an explicit unfold + matmul instead of a convolution.
    patches = pixels.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
    w = sd["vision_model.embeddings.patch_embedding.weight"].reshape(v.hidden_size, -1)
    x = patches @ w.T + sd["vision_model.embeddings.patch_embedding.bias"]
    cls = sd["vision_model.embeddings.class_embedding"].expand(n, 1, -1)
    x = torch.cat([cls, x], 1) + sd["vision_model.embeddings.position_embedding"]
    heads, d = v.num_attention_heads, v.hidden_size
    for i in range(v.num_hidden_layers):
        L = lambda k, i=i: sd.get(f"vision_model.encoder.layers.{i}.{k}")  # noqa: E731
        h = plain_norm(x, L("norm1.weight"), L("norm1.bias"), v.layer_norm_eps, v.norm_type)
        qkv = h @ L("attn.qkv.weight").T
        if L("attn.qkv.bias") is not None:
            qkv = qkv + L("attn.qkv.bias")
        q, k, val = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        if v.qk_normalization:
            q = plain_norm(q, L("attn.q_norm.weight"), L("attn.q_norm.bias"), v.layer_norm_eps, v.norm_type)
            k = plain_norm(k, L("attn.k_norm.weight"), L("attn.k_norm.bias"), v.layer_norm_eps, v.norm_type)
        hd = d // heads
        outs = []
        for hh in range(heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), -1)
            outs.append(att @ val[..., sl])
        a = torch.cat(outs, -1) @ L("attn.proj.weight").T + L("attn.proj.bias")
        x = x + a * L("ls1")
        h = plain_norm(x, L("norm2.weight"), L("norm2.bias"), v.layer_norm_eps, v.norm_type)
        m = F.gelu(h @ L("mlp.fc1.weight").T + L("mlp.fc1.bias")) @ L("mlp.fc2.weight").T + L("mlp.fc2.bias")
        x = x + m * L("ls2")
    return x


def test_vision_features_match_plain_computation():
    for norm_type, qk in (("rms_norm", True), ("layer_norm", False)):
        model, cfg, sd = small_model(norm_type=norm_type, qk=qk)
        pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = model.vision_model(pixels)
        ref = plain_vision(sd, cfg, pixels)
        assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4), (norm_type, (ours - ref).abs().max())


def test_pixel_shuffle_known_values():
    # [1, w=2, h=2, c=4]: entry value encodes (w, h, c) as 100w + 10h + c.
    x = torch.tensor([[[[100 * w + 10 * h + c for c in range(4)] for h in range(2)] for w in range(2)]], dtype=torch.float32)
    v1 = pixel_shuffle(x, 0.5, "v1")
    v2 = pixel_shuffle(x, 0.5, "v2")
    assert v1.shape == v2.shape == (1, 1, 1, 16)
    # v1 reads the w axis fastest within each h half; v2 transposes the grid back first.
    assert v1.flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 100, 101, 102, 103, 110, 111, 112, 113]
    assert v2.flatten().tolist() == v1.flatten().tolist()
    big = torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(1, 4, 4, 2)
    a, b = pixel_shuffle(big, 0.5, "v1"), pixel_shuffle(big, 0.5, "v2")
    assert a.shape == b.shape == (1, 2, 2, 8)
    assert torch.equal(a.permute(0, 2, 1, 3), b)
    # Token (0, 0) of v2 gathers input rows 0-1 and columns 0-1.
    assert b[0, 0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def plain_qwen2(sd, cfg, ids):
    llm = cfg.llm
    d, heads, kv = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = d // heads
    eps = llm["rms_norm_eps"]
    T = ids.shape[0]
    x = sd["language_model.model.embed_tokens.weight"][ids]
    inv = 1.0 / (llm["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    def rms(t, w):
        return w * t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps)

    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(llm["num_hidden_layers"]):
        L = lambda k, i=i: sd[f"language_model.model.layers.{i}.{k}"]  # noqa: E731
        h = rms(x, L("input_layernorm.weight"))
        q = h @ L("self_attn.q_proj.weight").T + L("self_attn.q_proj.bias")
        k = h @ L("self_attn.k_proj.weight").T + L("self_attn.k_proj.bias")
        v = h @ L("self_attn.v_proj.weight").T + L("self_attn.v_proj.bias")
        outs = []
        for hh in range(heads):
            g = hh // (heads // kv)
            qh = rope(q[:, hh * hd:(hh + 1) * hd])
            kh = rope(k[:, g * hd:(g + 1) * hd])
            att = torch.softmax(qh @ kh.T / math.sqrt(hd) + mask, -1)
            outs.append(att @ v[:, g * hd:(g + 1) * hd])
        x = x + torch.cat(outs, -1) @ L("self_attn.o_proj.weight").T
        h = rms(x, L("post_attention_layernorm.weight"))
        m = F.silu(h @ L("mlp.gate_proj.weight").T) * (h @ L("mlp.up_proj.weight").T)
        x = x + m @ L("mlp.down_proj.weight").T
    x = rms(x, sd["language_model.model.norm.weight"])
    return x @ sd["language_model.lm_head.weight"].T


def test_logits_match_plain_qwen2_and_image_merge():
    model, cfg, sd = small_model()
    ids = torch.tensor([1, 5, 9, 30, 31, 200, 17])
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
    assert torch.allclose(ours, plain_qwen2(sd, cfg, ids), atol=1e-4, rtol=1e-4)

    # Visual tokens replace the <IMG_CONTEXT> embeddings in order, and nothing else.
    n = cfg.num_image_token
    ids_img = torch.tensor([[1, 5] + [7] * n + [9]])
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = model.input_embeddings(ids_img, pixels)
        feats = model.image_features(pixels)
    table = sd["language_model.model.embed_tokens.weight"]
    assert torch.equal(emb[0, 2:2 + n], feats)
    assert torch.equal(emb[0, :2], table[[1, 5]])
    assert torch.equal(emb[0, -1], table[9])
