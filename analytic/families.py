"""The analytic model of any transformers model flopdiff describes by family, from its config alone: the families'
formulas, each written once from analytic.layers primitives (the table of which model types belong to which family,
and where its modules sit in the traced model, is tracer.core.models.FAMILIES: the adapter and the generic mapping
table read it too).

Families (transformers 5 code, the one the generic adapter runs):
  * dense decoder (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2): RMSNorm, q/k/v/o projections (Qwen2: q, k, v with bias; Qwen3: an
    RMSNorm per head on q and k), RoPE, attention over the cache (GQA: the KV cache holds the kv heads), a gated MLP,
    lm_head on the one logit the forward keeps (logits_to_keep=1);
  * MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE): the same attention; a router (linear over the experts) and the
    routed experts (top-k rows through gate+up and down; routing-independent: every routed row counted once, as the
    grouped GEMM runs it), Qwen2-MoE's shared expert and its sigmoid gate;
  * DeepSeek-V3: multi-head latent attention (q through its low-rank pair or q_proj; the compressed kv and the shared
    rope key, kv_b_proj's per-head keys and values: transformers caches those, not the latent), the first
    `first_k_dense_replace` layers dense, then routed + shared experts behind the float32 router;
  * LLaVA: CLIP's vision tower (patch conv, class token, positions, pre-norm, every layer: transformers runs all and
    selects `vision_feature_layer`'s output), the two-layer projector on the image tokens, the dense decoder.
A model type of no family is traced and counted; its analytic model has no layers, so every node is reported without
one (the coverage table says what).

The tensor-core FLOPs of these formulas are exact (tests/test_families.py against the trace and FlopCounterMode); the
CUDA-core FLOPs and bytes use the same primitives as DeepSeek-OCR-2's transformers 5 decoder, not checked node for
node per family (the gaps say where they differ).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

from analytic.blocks import K, attention_op, gated, residual, rms_norm, rope_angles, rope_apply
from analytic.layers import Attention, Block, Conv2d, Elementwise, Embedding, Experts, KVCache, Layer, Linear, Rope
from analytic.request import ModelTree, Shape, Variant
from analytic.series import Steps
from analytic.shapes import Views
from tracer.core.conventions import CLOSED_FORM_STEPS
from tracer.core.errors import FlopdiffError
from tracer.core.models import family_of

# ---- the decoder families ---------------------------------------------------------------------------------------

def _transformers_5() -> bool:
    """Which transformers the adapter runs (its formulas follow that code; torch-free: the metadata only)."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0]) >= 5
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return True


TRANSFORMERS_5 = _transformers_5()


@dataclass(frozen=True)
class Text:
    """A decoder's numbers, read from its (text) config."""

    cfg: dict
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    model_type: str
    where: str  # the config, as errors name it

    @classmethod
    def of(cls, cfg: dict, where: str) -> "Text":
        get = lambda k: _get(cfg, k, where)  # noqa: E731
        heads = get("num_attention_heads")
        return cls(cfg, get("hidden_size"), heads, cfg.get("num_key_value_heads") or heads,
                   cfg.get("head_dim") or get("hidden_size") // heads, get("num_hidden_layers"), get("vocab_size"),
                   cfg.get("model_type", ""), where)

    def get(self, key: str) -> Any:
        return _get(self.cfg, key, self.where)


def _get(cfg: dict, key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise FlopdiffError(f"{where}: missing key {key!r}")
    return cfg[key]


def _attention(t: Text, p: str, new: int, kv_len: int, attn_op: str) -> list[Layer]:
    """Grouped-query attention as transformers 5's Llama writes it (Qwen2: q, k and v with bias; Qwen3: RMSNorm per
    head on q and k before RoPE)."""
    bias = t.model_type == "qwen2" or bool(t.cfg.get("attention_bias"))
    hd = t.head_dim
    layers: list[Layer] = [
        Linear(f"{p}.q_proj", op="addmm" if bias else "mm", tokens=new, d_in=t.hidden, d_out=t.heads * hd, bias=bias),
        Linear(f"{p}.k_proj", op="addmm" if bias else "mm", tokens=new, d_in=t.hidden, d_out=t.kv_heads * hd, bias=bias),
        Linear(f"{p}.v_proj", op="addmm" if bias else "mm", tokens=new, d_in=t.hidden, d_out=t.kv_heads * hd, bias=bias),
    ]
    if t.model_type in ("qwen3", "qwen3_moe"):
        layers += [rms_norm(f"{p}.q_norm", new * t.heads, hd), rms_norm(f"{p}.k_norm", new * t.kv_heads, hd)]
    return layers + [
        rope_apply(f"{p}.rope_apply", new, t.heads, t.kv_heads, hd),
        Attention(f"{p}.attn", op=attn_op, heads=t.heads, s_q=new, s_k=kv_len, d=hd, d_v=hd, causal=True),
        Linear(f"{p}.o_proj", tokens=new, d_in=t.heads * hd, d_out=t.hidden,
               bias=bool(t.cfg.get("attention_bias")) and t.model_type != "qwen2"),
        KVCache(f"{p}.kv_cache", positions=kv_len, kv_heads=t.kv_heads, d=hd),
    ]


def _latent_attention(t: Text, p: str, new: int, kv_len: int, attn_op: str) -> list[Layer]:
    """DeepSeek-V3's multi-head latent attention (transformers 5's DeepseekV3Attention): q through q_a_proj, its
    RMSNorm and q_b_proj (or q_proj without a q rank); kv_a_proj_with_mqa makes the compressed kv (kv_lora_rank) and
    the one rope key, which the cache keeps (the latent, not per-head keys and values: kv_lora_rank + qk_rope_head_dim
    per position, as two one-head tensors); every forward expands the whole cache through kv_b_proj into the per-head
    nope keys and values (kv_len rows, not the new tokens': a decode step's kv_b_proj grows with the cache)."""
    c, h, heads = t.cfg, t.hidden, t.heads
    nope, rope, v, kv_rank, q_rank = (t.get("qk_nope_head_dim"), t.get("qk_rope_head_dim"), t.get("v_head_dim"),
                                      t.get("kv_lora_rank"), c.get("q_lora_rank"))
    qk = nope + rope
    q = ([Linear(f"{p}.q_a_proj", tokens=new, d_in=h, d_out=q_rank), rms_norm(f"{p}.q_a_layernorm", new, q_rank),
          Linear(f"{p}.q_b_proj", tokens=new, d_in=q_rank, d_out=heads * qk)] if q_rank else
         [Linear(f"{p}.q_proj", tokens=new, d_in=h, d_out=heads * qk)])
    return q + [
        Linear(f"{p}.kv_a_proj_with_mqa", tokens=new, d_in=h, d_out=kv_rank + rope),
        rms_norm(f"{p}.kv_a_layernorm", new, kv_rank),
        Linear(f"{p}.kv_b_proj", tokens=kv_len, d_in=kv_rank, d_out=heads * (nope + v)),
        rope_apply(f"{p}.rope_apply", new, heads, 1, rope),
        Attention(f"{p}.attn", op="sdpa_unequal" if attn_op == "sdpa" and qk != v else attn_op, heads=heads, s_q=new,
                  s_k=kv_len, d=qk, d_v=v, causal=True),
        Linear(f"{p}.o_proj", tokens=new, d_in=heads * v, d_out=h),
        # the latent and the rope key, as KVCache's "keys and values" of one head (their mean width)
        KVCache(f"{p}.kv_cache", positions=kv_len, kv_heads=1, d=(kv_rank + rope) / 2),
    ]


def _dense_mlp(p: str, new: int, hidden: int, inter: int) -> list[Layer]:
    return [Linear(f"{p}.gate_proj", tokens=new, d_in=hidden, d_out=inter),
            Linear(f"{p}.up_proj", tokens=new, d_in=hidden, d_out=inter),
            gated(f"{p}.act", new, inter),
            Linear(f"{p}.down_proj", tokens=new, d_in=inter, d_out=hidden)]


#: per MoE model type, the config keys of (experts, top-k, expert width, shared expert width), its shared experts'
#: count key (their width is n x the expert's) and the router weight's bytes; a key's alternatives in a tuple (the
#: name transformers' attribute_map gives it and the one to_dict writes)
MOE_KEYS: dict[str, tuple[tuple, str | None, int]] = {
    "mixtral": ((("num_local_experts", "num_experts"), "num_experts_per_tok", "intermediate_size", None), None, 2),
    "qwen2_moe": ((("num_experts", "num_local_experts"), "num_experts_per_tok", "moe_intermediate_size",
                   "shared_expert_intermediate_size"), None, 2),
    "qwen3_moe": ((("num_local_experts", "num_experts"), "num_experts_per_tok", "moe_intermediate_size", None), None, 2),
    # the router weighs in float32 (DeepseekV3TopkRouter: both operands cast)
    "deepseek_v3": (("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", None), "n_shared_experts", 4),
}


def _moe_numbers(t: "Text") -> tuple[int, int, int, int, int]:
    (experts, k, inter, shared), count, router = MOE_KEYS[t.model_type]
    c = t.cfg
    pick = lambda keys: next((c[k] for k in ((keys,) if isinstance(keys, str) else keys) if c.get(k) is not None),  # noqa: E731
                             None)
    n, top, width = pick(experts), pick(k), pick(inter)
    for key, value in ((experts, n), (k, top), (inter, width)):
        if value is None:
            raise FlopdiffError(f"{t.where}: missing key {key if isinstance(key, str) else key[0]!r}")
    width_shared = (pick(shared) or 0) if shared else width * (c.get(count) or 0) if count else 0
    return n, top, width, width_shared, router


def _moe(t: Text, p: str, new: int, experts_op: str) -> list[Layer]:
    """Router, routed experts (top-k rows each through gate+up and down), and the shared expert(s) where the family
    has them (Qwen2-MoE: one, behind a sigmoid gate; DeepSeek-V3: n_shared_experts wide)."""
    n, k, inter, shared, router = _moe_numbers(t)
    rows, h = new * k, t.hidden
    layers: list[Layer] = [
        Linear(f"{p}.gate", tokens=new, d_in=h, d_out=n, dtype_bytes=router,
               glue=(("softmax over the experts", K["softmax"] * new * n),)),
        Experts(f"{p}.experts", op=experts_op, routed_rows=rows, d=h, inter=inter, n_experts=n,
                glue=(("routing weights applied", rows * h), ("top-k summed", rows * h))),
    ]
    if shared:
        name = "shared_expert" if t.model_type == "qwen2_moe" else "shared_experts"
        layers += _dense_mlp(f"{p}.{name}", new, h, shared)
        if t.model_type == "qwen2_moe":
            layers.append(Linear(f"{p}.shared_expert_gate", tokens=new, d_in=h, d_out=1))
    return layers


def _dense_layers(t: Text) -> tuple[bool, ...]:
    """Per decoder layer: a dense MLP (True) or experts."""
    c = t.cfg
    if t.model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        return (True,) * t.layers
    if t.model_type == "deepseek_v3":
        return tuple(i < c.get("first_k_dense_replace", 0) for i in range(t.layers))
    if t.model_type in ("qwen2_moe", "qwen3_moe"):
        step, only = c.get("decoder_sparse_step") or 1, set(c.get("mlp_only_layers") or ())
        return tuple(i in only or (i + 1) % step != 0 for i in range(t.layers))
    return (False,) * t.layers  # mixtral: every layer's MLP is its experts


def decoder(t: Text, prefix: str, new: int, kv_len: int, attn_op: str, experts_op: str) -> Block:
    """The decoder over `new` tokens attending to `kv_len` positions (cache included), lm_head on one logit."""
    attend = _latent_attention if t.model_type == "deepseek_v3" else _attention
    rope_d = t.get("qk_rope_head_dim") if t.model_type == "deepseek_v3" else t.head_dim
    # transformers 5 makes the angles by a broadcast product; 4.x by a matmul, inv_freq @ positions (a bmm)
    angles = (rope_angles(f"{prefix}.rotary_emb.inv_freq", new, rope_d, ("positions", new)) if TRANSFORMERS_5 else
              Rope(f"{prefix}.rotary_emb.inv_freq", positions=new, half_dim=rope_d // 2))
    kids: list[Layer] = [Embedding(f"{prefix}.embed_tokens", tokens=new, d=t.hidden, vocab=t.vocab), angles]
    for i, dense in enumerate(_dense_layers(t)):
        p = f"{prefix}.layers.{i}"
        inter = t.get("intermediate_size")
        kids.append(Block(p, children=[
            rms_norm(f"{p}.input_layernorm", new, t.hidden),
            *attend(t, p, new, kv_len, attn_op),
            rms_norm(f"{p}.post_attention_layernorm", new, t.hidden),
            *(_dense_mlp(f"{p}.mlp", new, t.hidden, inter) if dense else _moe(t, f"{p}.mlp", new, experts_op)),
            residual(f"{p}.residual", 2, new, t.hidden),
        ]))
    kids += [rms_norm(f"{prefix}.norm", new, t.hidden), Linear("lm_head", tokens=1, d_in=t.hidden, d_out=t.vocab)]
    return Block(prefix, children=kids)


# ---- the vision-language family -----------------------------------------------------------------------------------

def clip_tower(prefix: str, vc: dict, where: str) -> tuple[Block, int]:
    """CLIP's vision tower (transformers CLIPVisionTransformer) on one image: the patch conv, the class token and the
    positions added, the pre-norm, every layer (q, k, v, out projections with bias, attention over every token,
    fc1/act/fc2) and the post-norm of the pooled class token; returns the tower and its tokens."""
    px, patch, width = _get(vc, "image_size", where), _get(vc, "patch_size", where), _get(vc, "hidden_size", where)
    heads, ffn, layers = (_get(vc, "num_attention_heads", where), _get(vc, "intermediate_size", where),
                          _get(vc, "num_hidden_layers", where))
    g = px // patch
    tokens, d = g * g + 1, width // heads
    kids: list[Layer] = [Conv2d(f"{prefix}.patch_embedding", c_in=vc.get("num_channels", 3), c_out=width, kernel=patch,
                                out_hw=(g, g), stride=patch),
                         Elementwise(f"{prefix}.position_embedding", elements=tokens * width, per_element=K["add"],
                                     weights=tokens * width),
                         Elementwise(f"{prefix}.pre_layrnorm", elements=tokens * width, per_element=K["norm"],
                                     weights=2 * width)]
    for i in range(layers):
        p = f"{prefix}.layers.{i}"
        kids.append(Block(p, children=[
            Elementwise(f"{p}.layer_norm1", elements=tokens * width, per_element=K["norm"], weights=2 * width),
            *[Linear(f"{p}.{n}", op="addmm", tokens=tokens, d_in=width, d_out=width, bias=True)
              for n in ("q_proj", "k_proj", "v_proj")],
            Attention(f"{p}.attn", heads=heads, s_q=tokens, s_k=tokens, d=d, d_v=d),
            Linear(f"{p}.out_proj", op="addmm", tokens=tokens, d_in=width, d_out=width, bias=True),
            Elementwise(f"{p}.layer_norm2", elements=tokens * width, per_element=K["norm"], weights=2 * width),
            Linear(f"{p}.fc1", op="addmm", tokens=tokens, d_in=width, d_out=ffn, bias=True),
            Elementwise(f"{p}.act", elements=tokens * ffn, per_element=2 + K["silu"]),
            Linear(f"{p}.fc2", op="addmm", tokens=tokens, d_in=ffn, d_out=width, bias=True),
            residual(f"{p}.residual", 2, tokens, width),
        ]))
    kids.append(Elementwise(f"{prefix}.post_layernorm", elements=width, per_element=K["norm"], weights=2 * width))
    return Block(prefix, children=kids), tokens


def llava_vision(cfg: dict, where: str, text_hidden: int) -> tuple[Block, int]:
    vc = _get(cfg, "vision_config", where)
    tower, tokens = clip_tower("vision.tower", vc, where)
    image = tokens - (0 if cfg.get("vision_feature_select_strategy", "default") == "full" else 1)
    width = _get(vc, "hidden_size", where)
    projector = Block("vision.projector", children=[
        Linear("vision.projector.linear_1", op="addmm", tokens=image, d_in=width, d_out=text_hidden, bias=True),
        Elementwise("vision.projector.act", elements=image * text_hidden, per_element=K["silu"]),
        Linear("vision.projector.linear_2", op="addmm", tokens=image, d_in=text_hidden, d_out=text_hidden, bias=True),
    ])
    return Block("vision", children=[tower, projector]), image


# ---- the stages -------------------------------------------------------------------------------------------------

NO_VIEWS = Views(crop_grid_wh=(1, 1), tiles=0, global_px=0, tile_px=0, image_tokens=0)


def build_hf(cfg: dict, shape: Shape, where: str = "config", variant: Variant = Variant(),
             attention: dict[str, str] | None = None) -> ModelTree:
    """The stages of an `hf:` model: vision (a vision-language family's tower and projector), prefill (vision, the
    decoder over BOS + image tokens + text, lm_head on one logit), decode (one-token steps, the cache growing; from
    CLOSED_FORM_STEPS steps on, step 0 and the closed form of steps 1..n-1, as the trace does)."""
    kind = cfg.get("model_type", "")
    model, family = f"hf:{kind}", family_of(kind)
    if family is None:  # no family: the trace is counted, its analytic model has no layers
        return ModelTree(model, NO_VIEWS, 1 + shape.text_tokens, {"vision": [], "prefill": [], "decode": []})
    attention = attention or {}
    attn_op, experts_op = attention_op(attention.get("decoder", "sdpa")), attention.get("experts", "grouped_mm")
    experts_op = {"grouped_mm": "grouped_mm", "batched_mm": "bmm", "eager": "mm"}.get(experts_op, "grouped_mm")
    text = Text.of(cfg.get("text_config") or cfg if family.vision else cfg, where)
    vision: list[Block] = []
    views = NO_VIEWS
    if family.vision:
        block, image = llava_vision(cfg, where, text.hidden)
        vision = [block]
        px = _get(cfg["vision_config"], "image_size", where)
        views = Views(crop_grid_wh=(1, 1), tiles=0, global_px=px, tile_px=px, image_tokens=image)
    prompt = 1 + views.image_tokens + shape.text_tokens
    tree = ModelTree(model, views, prompt)
    tree.stages["vision"] = vision
    tree.stages["prefill"] = [Block("prefill", children=[*vision, decoder(text, "decoder", prompt, prompt, attn_op,
                                                                          experts_op)])]
    grow = 1 if variant.decode_kv_growth else 0
    step = lambda k: decoder(text, "decoder", 1, prompt + grow * (k + 1), attn_op, experts_op)  # noqa: E731
    steps = shape.decode_steps
    tree.stages["decode"] = ([step(0), Steps("decode", build=step, first=1, last=steps - 1)]
                             if steps >= CLOSED_FORM_STEPS else [step(k) for k in range(steps)])
    return tree
