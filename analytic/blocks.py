"""The blocks both models are made of, each a function of config numbers: SAM, CLIP and the Qwen2-style encoder on
the vision side, the DeepSeek-V2 decoder (dense and MoE layers, KV cache, lm_head), and the stage layout. Numbers the
vendor code fixes outside config.json are in `VENDOR_CONSTANTS`, each with the file that fixes it. Stages: `vision`
(every view through the vision encoders and the projector), `prefill` (vision + the decoder over the prompt +
lm_head), `decode` (one Block per one-token step, KV length growing)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from analytic.layers import (Attention, Block, Buffer, Conv2d, Elementwise, Embedding, Experts, KVCache, Layer, Layout,
                             Linear, RelPos, Rope)
from analytic.request import ModelTree, Variant
from analytic.series import Steps
from analytic.shapes import Views
from tracer.core.configfile import dig
from tracer.core.conventions import CLOSED_FORM_STEPS, CUDA_CORE_PER_ELEMENT
from tracer.core.errors import FlopdiffError

# Numbers the vendor code fixes outside config.json (v1: deepencoder.py build_sam_vit_b / build_clip_l;
# v2: transformers DeepseekOcr2SamVisionConfig defaults, checked against transformers in the tests).
VENDOR_CONSTANTS = {
    "deepseek-ocr": {"patch": 16, "window": 14, "sam_mlp_ratio": 4, "neck": 256, "clip_ffn": 4096, "downsample": 4,
                     "neck_norm": "layer_norm_2d",  # deepencoder.py LayerNorm2d
                     "sam_layout": "deepencoder"},  # its layout copies (blocks.sam's _sam_layout)
    "deepseek-ocr-2": {"patch": 16, "window": 14, "sam_mlp_ratio": 4.0, "neck": 256, "downsample": 4, "sam_px": 1024,
                       "rel_pos_resize_always": True,  # DeepseekOcr2SamVisionAttention.get_rel_pos
                       "sam_layout": "transformers"},  # its layout copies (blocks.sam's _sam_layout)
}


def config_value(cfg: dict, dotted: str, where: str) -> Any:
    try:
        return dig(cfg, dotted)
    except KeyError:
        raise FlopdiffError(f"{where}: missing key {dotted!r}") from None


def _shared(builder):
    """Memoize a block builder on its arguments: a sweep over page shapes rebuilds the same few vision blocks
    (a tile count, a view size) thousands of times. Blocks are never mutated after building."""
    cache: dict[str, Block] = {}

    @functools.wraps(builder)
    def build(*args, **kwargs) -> Block:
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            if len(cache) >= 1024:  # bounded: an odd sweep of custom view sizes must not grow without end
                cache.clear()
            cache[key] = builder(*args, **kwargs)
        return cache[key]

    return build


K = CUDA_CORE_PER_ELEMENT


def rms_norm(lid: str, rows: int, width: int) -> Elementwise:
    """RMSNorm as transformers writes it (x.pow(2).mean(-1) + eps, rsqrt, x * it, weight * x): 4 per element, the eps
    add and the rsqrt once per row."""
    return Elementwise(lid, elements=rows * width, per_element=K["norm"], weights=width,
                       glue=(("eps add and rsqrt, per row", 2 * rows),))


def rope_apply(lid: str, rows: int, heads: int, kv_heads: int, d: int, positions: int | None = None) -> Elementwise:
    """apply_rotary_pos_emb on q and k: x * cos + rotate_half(x) * sin (two products and an add per element), and
    rotate_half's negation of half of them; it reads q, k, cos and sin (per position: `positions`, shared by a batch
    of views) and writes q and k."""
    e = rows * d * (heads + kv_heads)
    return Elementwise(lid, elements=e, per_element=3, glue=(("rotate_half's negation, half the elements", e // 2),),
                       traffic=(("q and k read and written", 2 * e * 2),
                                ("cos and sin read", 2 * (positions or rows) * d * 2)))


def rope_angles(lid: str, positions: int, d: int, *extra: tuple[str, int], made_apart: bool = False) -> Buffer:
    """transformers 5 RoPE angles from the inverse frequencies (a float32 buffer): inv_freq x positions as a broadcast
    product (d/2 per position), cos and sin of the d angles, each scaled by attention_scaling; it writes cos and sin
    (bf16), and reads the positions where another layer made them (`made_apart`: v2's encoder, with its mask)."""
    read = (("the positions read (int64)", positions * 8),) if made_apart else ()
    return Buffer(lid, elements=d // 2, dtype_bytes=4,
                  glue=(("angles: inv_freq x positions", positions * d // 2), ("cos, sin and their scaling", 4 * positions * d),
                        *extra), traffic=(*read, ("cos and sin written", 2 * positions * d * 2)))


def gated(lid: str, rows: int, inter: int) -> Elementwise:
    """act_fn(gate) * up: SiLU and the product; it reads gate and up, writes their product."""
    return Elementwise(lid, elements=rows * inter, per_element=K["silu_gated"],
                       traffic=(("gate and up read, the product written", 3 * rows * inter * 2),))


def residual(lid: str, adds: int, rows: int, width: int) -> Elementwise:
    """The residual adds of a block (`adds` of them over rows x width): each reads its branch's output, the first the
    block's input too, and writes the stream."""
    return Elementwise(lid, elements=adds * rows * width, per_element=K["add"],
                       traffic=(("the input and each branch read, the stream written", (2 * adds + 1) * rows * width * 2),))


# The op that carries an attention implementation's matmuls (Layer.op: what policy `torch` asks FlopCounterMode
# about). Any other name is a function registered by a plugin: a kernel launched from Python, which it never sees.
ATTENTION_OPS = {"eager": "bmm", "sdpa": "sdpa", "flash_attention_2": "flash_attn", "flex_attention": "flex"}


def attention_op(implementation: str) -> str:
    return ATTENTION_OPS.get(implementation, "python")


@_shared
def sam(prefix: str, views: int, px: int, width: int, layers: int, heads: int, global_idx: list[int],
        mlp: int, neck: int, down: list[int], c: dict, attn_op: str = "sdpa") -> Block:
    """SAM ViT-B over `views` images of `px` pixels: windowed blocks pad the grid to a multiple of the
    window (padded tokens cost FLOPs), global blocks attend over the whole grid."""
    g = px // c["patch"]
    g0 = c.get("sam_px", 1024) // c["patch"]  # the grid SAM was trained on: its position tables' size
    win = c["window"]
    d = width // heads
    norm = CUDA_CORE_PER_ELEMENT["norm"]
    # the absolute position table, resized to the grid when it differs (bicubic, antialiased), added to every view
    resize = (("resize to the grid", K["bicubic_interp"] * width * g * g),) if g != g0 else ()
    kids: list[Layer] = [Conv2d(f"{prefix}.patch_embed", batch=views, c_in=3, c_out=width, kernel=c["patch"], out_hw=(g, g),
                                bias=True, stride=c["patch"]),
                         Buffer(f"{prefix}.pos_embed", elements=g0 * g0 * width, dtype_bytes=2,
                                glue=(*resize, ("add", views * g * g * width)),
                                traffic=(("the patch embeddings read, their sum written", 2 * views * g * g * width * 2),)
                                if c.get("sam_layout") else ())]
    for i in range(layers):
        p = f"{prefix}.blocks.{i}"
        if i in global_idx:
            batch, side, table = views, g, 2 * g0 - 1
        else:
            gp = -(-g // win) * win
            batch, side, table = views * (gp // win) ** 2, win, 2 * win - 1
        tokens = batch * side * side
        bias = batch * heads * (side * side) ** 2  # the decomposed rel-pos bias, one per score
        # the einsums' products (rel_h, rel_w: one per query and key row or column), which deepencoder.py copies
        # to lay them out for the bias (transformers' SAM adds them as views and copies the bias instead)
        products = 2 * batch * heads * side ** 3 * 2 if c.get("sam_layout") == "deepencoder" else 0
        # SAM under SDPA: its layout copies, the bias materialised and read by the attention
        laid = attn_op == "sdpa" and c.get("sam_layout") in ("transformers", "deepencoder")
        kids.append(Block(p, children=[
            Elementwise(f"{p}.norm1", elements=views * g * g * width, per_element=norm, weights=2 * width),
            *([_sam_layout(f"{p}.layout", views * g * g, tokens, width, bias, batch, windowed=i not in global_idx,
                           products=products)] if laid else []),
            Linear(f"{p}.qkv", op="addmm", tokens=tokens, d_in=width, d_out=3 * width, bias=True),
            RelPos(f"{p}.rel_pos", batch_heads=batch * heads, h=side, w=side, d=d, table=table,
                   glue=_rel_pos_glue(side, d, table, c.get("rel_pos_resize_always", False)),
                   traffic=(("q read, and its copy for the einsums", 2 * tokens * width * 2),
                            *((("the products written, their copies read", 2 * products),) if products else ()),
                            ("the bias written", bias * 2)) if laid else ()),
            Attention(f"{p}.attn", op=attn_op, batch=batch, heads=heads, s_q=side * side, s_k=side * side, d=d, d_v=d,
                      glue=(("q scaled", tokens * width), ("rel-pos bias added to the scores", bias))
                      if attn_op == "bmm" else (),
                      traffic=(("q, k and v read", 3 * tokens * width * 2), ("the bias read", bias * 2),
                               ("the output written", tokens * width * 2)) if laid else ()),
            Linear(f"{p}.proj", op="addmm", tokens=tokens, d_in=width, d_out=width, bias=True),
            Elementwise(f"{p}.norm2", elements=views * g * g * width, per_element=norm, weights=2 * width),
            Linear(f"{p}.mlp.lin1", op="addmm", tokens=views * g * g, d_in=width, d_out=mlp, bias=True),
            Elementwise(f"{p}.mlp.act", elements=views * g * g * mlp, per_element=8),
            Linear(f"{p}.mlp.lin2", op="addmm", tokens=views * g * g, d_in=mlp, d_out=width, bias=True),
            residual(f"{p}.residual", 2, views * g * g, width),
        ]))
    kids += [Conv2d(f"{prefix}.neck.conv1", batch=views, c_in=width, c_out=neck, kernel=1, out_hw=(g, g)),
             _neck_norm(f"{prefix}.neck.norm1", views * g * g, neck, c),
             Conv2d(f"{prefix}.neck.conv2", batch=views, c_in=neck, c_out=neck, kernel=3, out_hw=(g, g)),
             _neck_norm(f"{prefix}.neck.norm2", views * g * g, neck, c),
             Conv2d(f"{prefix}.net_2", batch=views, c_in=neck, c_out=down[0], kernel=3, out_hw=(g // 2, g // 2), stride=2),
             Conv2d(f"{prefix}.net_3", batch=views, c_in=down[0], c_out=down[1], kernel=3, out_hw=(g // 4, g // 4),
                    stride=2)]
    if c.get("sam_layout") == "deepencoder":  # ImageEncoderViT.forward: net_3(x2.clone())
        kids.insert(-1, Layout(f"{prefix}.layout", traffic=(("net_2's output copied for net_3",
                                                              2 * views * down[0] * (g // 2) ** 2 * 2),)))
    return Block(prefix, children=kids)


def _sam_layout(lid: str, grid: int, tokens: int, width: int, bias: int, batch: int, windowed: bool,
                products: int = 0) -> Layout:
    """SAM block copies (bf16): q, k and v split per head and q again for the rel-pos einsums, the output transposed
    back (one image over its whole grid: q, k and v stay views of the qkv output, q is read in place and copied for
    each einsum), the bias reshaped for SDPA (transformers) or the einsums' `products` (bytes) copied to lay them out
    for it (deepencoder.py); a windowed block also partitions its (padded) grid into windows and puts them back.
    `grid`: the block's tokens, `tokens`: its windows' (padded), `batch`: windows x views."""
    a, t = grid * width * 2, tokens * width * 2
    if batch > 1:
        copies = [("q, k and v split per head", 2 * 3 * t), ("q for the rel-pos einsums", t),
                  ("the output transposed back", 2 * t)]
    else:  # the span of q's rows in the qkv output (3 x width apart)
        copies = [("q read in place", ((tokens - 1) * 3 * width + width) * 2), ("q copied for each einsum", 2 * t)]
    copies.append(("the rel-pos products laid out for the bias", 2 * products) if products else
                  ("the bias reshaped", 2 * bias * 2))
    if windowed:
        copies += [("the grid partitioned into windows (padded)", a + t), ("the windows put back", t + a)]
    return Layout(lid, traffic=tuple(copies))


def _neck_norm(lid: str, pixels: int, channels: int, c: dict) -> Elementwise:
    """The neck's channel norm: v2's LayerNorm (4 per element); v1's LayerNorm2d written out (deepencoder.py: two means,
    two differences, a square, a divide, the scale and the shift per element; the eps add and a sqrt per pixel)."""
    if c.get("neck_norm") == "layer_norm_2d":
        return Elementwise(lid, elements=pixels * channels, per_element=8, weights=2 * channels,
                           glue=(("eps add and sqrt, per pixel", 2 * pixels),))
    return Elementwise(lid, elements=pixels * channels, per_element=K["norm"], weights=2 * channels)


def _rel_pos_glue(side: int, d: int, table: int, always: bool) -> tuple[tuple[str, int], ...]:
    """get_rel_pos, once per axis: the table resized to 2 * side - 1 rows (linear) when it differs, or `always`
    (transformers' SAM resizes unconditionally), the relative coordinates (two scaled aranges, their difference and
    its offset)."""
    resize = (("tables resized to the grid", 2 * K["linear_interp"] * d * (2 * side - 1)),) if always or table != 2 * side - 1 else ()
    return (*resize, ("relative coordinates", 2 * (2 * side + 2 * side * side)))


@_shared
def clip(prefix: str, views: int, tokens: int, width: int, layers: int, heads: int, ffn: int,
         positions: int = 257) -> Block:
    """v1's CLIP-L on SAM features (its patch embedding replaced, never read), class token included in `tokens`; its
    class embedding and position table (`positions` rows, interpolated to the grid) read whole."""
    t = views * tokens
    d = width // heads
    norm = CUDA_CORE_PER_ELEMENT["norm"]
    # the position table resized to the grid when it differs (get_abs_pos: bicubic, antialiased), added to every view
    grid, trained = round((tokens - 1) ** 0.5), round((positions - 1) ** 0.5)
    resize = (("resize to the grid", K["bicubic_interp"] * width * grid * grid),) if grid != trained else ()
    head: list[Layer] = [Buffer(f"{prefix}.class_embedding", elements=width, dtype_bytes=2,
                                traffic=(("SAM's features read", views * (tokens - 1) * width * 2),
                                         ("with the class token, written", t * width * 2))),
                         Buffer(f"{prefix}.position_embedding", elements=positions * width, dtype_bytes=2,
                                glue=(*resize, ("add", t * width)),
                                traffic=(("the position ids read (int64)", positions * 8),
                                         ("the embeddings read, their sum written", 2 * t * width * 2))),
                         Elementwise(f"{prefix}.pre_layrnorm", elements=t * width, per_element=norm, weights=2 * width)]
    return Block(prefix, children=head + [Block(f"{prefix}.layers.{i}", children=[
        Elementwise(f"{prefix}.layers.{i}.layer_norm1", elements=t * width, per_element=norm, weights=2 * width),
        Linear(f"{prefix}.layers.{i}.qkv", op="addmm", tokens=t, d_in=width, d_out=3 * width, bias=True),
        Attention(f"{prefix}.layers.{i}.attn", batch=views, heads=heads, s_q=tokens, s_k=tokens, d=d, d_v=d),
        Linear(f"{prefix}.layers.{i}.out_proj", op="addmm", tokens=t, d_in=width, d_out=width, bias=True),
        Elementwise(f"{prefix}.layers.{i}.layer_norm2", elements=t * width, per_element=norm, weights=2 * width),
        Linear(f"{prefix}.layers.{i}.mlp.fc1", op="addmm", tokens=t, d_in=width, d_out=ffn, bias=True),
        # quick GELU, x * sigmoid(1.702 x): the scale, the sigmoid (3) and the product
        Elementwise(f"{prefix}.layers.{i}.mlp.act", elements=t * ffn, per_element=2 + K["silu"]),
        Linear(f"{prefix}.layers.{i}.mlp.fc2", op="addmm", tokens=t, d_in=ffn, d_out=width, bias=True),
        residual(f"{prefix}.layers.{i}.residual", 2, t, width),
    ]) for i in range(layers)])


@_shared
def qwen2_encoder(prefix: str, views: int, n: int, enc: dict, head_dim: int, layers: int | None = None,
                  attn_op: str = "sdpa") -> Block:
    """v2's Qwen2-style encoder over n SAM tokens + n learned queries (image tokens both ways, queries
    causal: counted dense, the mask is data to SDPA)."""
    s, h = 2 * n, enc["hidden_size"]
    heads, kv, inter = enc["num_attention_heads"], enc["num_key_value_heads"], enc["intermediate_size"]
    t = views * s
    # RoPE angles: a broadcast multiply in transformers 5, no matmul; the learned queries of this view size, read whole
    # the hybrid mask (image tokens both ways, queries causal): positions, comparisons and their combination, built
    # once per view batch (eager attention: made additive, a `where`), then selected into every layer's scores
    mask = 2 * s + 2 * s * s + 3 * views * s * s + views * s + (views * s * s if attn_op == "bmm" else 0)
    kids: list[Layer] = [Buffer(f"{prefix}.queries", elements=n * h, dtype_bytes=2, param=f"queries_{n}",
                                traffic=(("the SAM tokens read", views * n * h * 2),
                                         ("tokens and queries written", views * 2 * n * h * 2))),
                         rope_angles(f"{prefix}.rotary_emb.inv_freq", s, head_dim, made_apart=True),
                         # it writes the positions (for RoPE) and the mask (bool); the query flags' fill value, a
                         # scalar tensor, is its one input
                         Elementwise(f"{prefix}.mask", elements=mask, per_element=1, dtype_bytes=1,
                                     traffic=(("the fill value read", 8), ("the positions written (int64)", s * 8),
                                              ("the mask written (bool)", views * s * s)) if attn_op == "sdpa" else ())]
    repeated = attn_op == "sdpa" and 1 < kv < heads
    for i in range(layers or enc["num_hidden_layers"]):
        p = f"{prefix}.layers.{i}"
        kids.append(Block(p, children=[
            rms_norm(f"{p}.input_layernorm", t, h),
            Linear(f"{p}.q_proj", op="addmm", tokens=t, d_in=h, d_out=heads * head_dim, bias=True),
            Linear(f"{p}.k_proj", op="addmm", tokens=t, d_in=h, d_out=kv * head_dim, bias=True),
            Linear(f"{p}.v_proj", op="addmm", tokens=t, d_in=h, d_out=kv * head_dim, bias=True),
            rope_apply(f"{p}.rope_apply", t, heads, kv, head_dim, positions=s),
            # SDPA on the CPU gets k and v repeated to every query head (repeat_kv: copies; one kv head repeats as a
            # stride-0 view, no copy)
            *([Layout(f"{p}.repeat_kv", traffic=(("k and v read", 2 * t * kv * head_dim * 2),
                                                  ("k and v per query head written", 2 * t * heads * head_dim * 2))
                      if repeated else (("one kv head: repeated as a stride-0 view, nothing copied", 0),))]
              if attn_op == "sdpa" and kv < heads else []),
            Attention(f"{p}.attn", op=attn_op, batch=views, heads=heads, s_q=s, s_k=s, d=head_dim, d_v=head_dim,
                      causal=False, glue=_eager_glue(attn_op, views * heads * s * s, masked=True) or
                      (("the mask selected into the scores", views * s * s),),
                      traffic=(("q, k and v read", t * (heads + 2 * (heads if repeated else kv)) * head_dim * 2),
                               ("the mask read", views * s * s),
                               ("the output written", t * heads * head_dim * 2)) if attn_op == "sdpa" else ()),
            Linear(f"{p}.o_proj", tokens=t, d_in=heads * head_dim, d_out=h),
            rms_norm(f"{p}.post_attention_layernorm", t, h),
            Linear(f"{p}.mlp.gate_proj", tokens=t, d_in=h, d_out=inter),
            Linear(f"{p}.mlp.up_proj", tokens=t, d_in=h, d_out=inter),
            gated(f"{p}.mlp.act", t, inter),
            Linear(f"{p}.mlp.down_proj", tokens=t, d_in=inter, d_out=h),
            residual(f"{p}.residual", 2, t, h),
        ]))
    kids.append(rms_norm(f"{prefix}.norm", t, h))
    return Block(prefix, children=kids)


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    dense_inter: int
    moe_inter: int
    experts: int
    top_k: int
    shared: int
    vocab: int
    dense_layers: tuple[bool, ...]   # per layer: dense MLP (True) or MoE (False)
    rope_per_layer: bool              # v1 (LlamaAttention 4.46) computes RoPE angles as a bmm in every layer;
                                      # transformers 5 (v2) uses a broadcast multiply: no matmul
    attn_op: str                      # "bmm" (eager) or "sdpa"
    experts_op: str                   # "mm" (v1 per-expert loop) or "grouped_mm"
    router_bytes: int = 2             # the MoE router's weight dtype: transformers 5 (v2) keeps it in float32
    inv_freq: bool = False            # RoPE's inverse frequencies a buffer read per forward (v2), float32
    # v1's attention (transformers 4.46 LlamaAttention) applies RoPE inline, where the trace cannot tell its ops
    # from the scores' scale and mask: counted on the attention; v2's apply_rotary_pos_emb is a layer of its own
    rope_apply_apart: bool = True
    # eager attention's mask for a one-token step: transformers 5 builds and adds it, 4.46 (v1) has none
    one_token_mask: bool = True
    # transformers 4.46 (v1): the first forward's keys and values appended to the empty cache (no copy; 5 concatenates
    # them onto an empty one), the positions made apart (an arange every layer's RoPE reads), the logits cast to
    # float32 by the vendor's forward
    transformers_446: bool = False


def decoder(spec: DecoderSpec, prefix: str, new: int, kv_len: int, logits: int) -> Block:
    """The decoder over `new` tokens attending to `kv_len` positions (cache included), lm_head on `logits`."""
    h, hd = spec.hidden, spec.head_dim
    kids: list[Layer] = []
    for i, dense in enumerate(spec.dense_layers):
        p = f"{prefix}.layers.{i}"
        layer: list[Layer] = [
            rms_norm(f"{p}.input_layernorm", new, h),
            Linear(f"{p}.q_proj", tokens=new, d_in=h, d_out=spec.heads * hd),
            Linear(f"{p}.k_proj", tokens=new, d_in=h, d_out=spec.kv_heads * hd),
            Linear(f"{p}.v_proj", tokens=new, d_in=h, d_out=spec.kv_heads * hd),
            *([rope_apply(f"{p}.rope_apply", new, spec.heads, spec.kv_heads, hd)] if spec.rope_apply_apart else []),
            Attention(f"{p}.attn", op=spec.attn_op, heads=spec.heads, s_q=new, s_k=kv_len, d=hd, d_v=hd, causal=True,
                      glue=_attention_glue(spec, new, kv_len), traffic=_attention_traffic(spec, new, kv_len)),
            Linear(f"{p}.o_proj", tokens=new, d_in=spec.heads * hd, d_out=h),
            KVCache(f"{p}.kv_cache", positions=kv_len, kv_heads=spec.kv_heads, d=hd,
                    concatenated=not (spec.transformers_446 and kv_len == new)),
            rms_norm(f"{p}.post_attention_layernorm", new, h),
        ]
        if spec.rope_per_layer:  # its angles' cos and sin, each scaled by attention_scaling
            layer.insert(3, Rope(f"{p}.rope", positions=new, half_dim=hd // 2,
                                 glue=(("cos, sin and their scaling", 4 * new * hd),),
                                 traffic=(("the positions read (int64)", new * 8), ("cos and sin written", 2 * new * hd * 2))))
        if dense:
            layer += [Linear(f"{p}.mlp.{n}", tokens=new, d_in=a, d_out=b) for n, a, b in
                      (("gate_proj", h, spec.dense_inter), ("up_proj", h, spec.dense_inter), ("down_proj", spec.dense_inter, h))]
            layer.insert(-1, gated(f"{p}.mlp.act", new, spec.dense_inter))
        else:
            si = spec.moe_inter * spec.shared
            rows = new * spec.top_k
            # v1's gate weighs in float32 and its fake-mode experts (the even split, tracer.vendors.deepseek_ocr_shims)
            # route by row position: the indices are written, never read
            routing = (("top-k weights (float32)", rows * 4) if spec.experts_op == "mm" else
                       ("top-k indices and weights", rows * (8 + spec.router_bytes)))
            layer += [Linear(f"{p}.mlp.gate", tokens=new, d_in=h, d_out=spec.experts, dtype_bytes=spec.router_bytes,
                             glue=(("softmax over the experts", K["softmax"] * new * spec.experts),
                                   ("top-k weights scaled", rows)),
                             traffic=(("hidden read", new * h * 2), routing)),
                      Experts(f"{p}.mlp.experts", op=spec.experts_op, routed_rows=rows, d=h, inter=spec.moe_inter,
                              n_experts=spec.experts, glue=_routing_glue(spec, new, rows),
                              traffic=(("hidden and the shared experts' output read, the sum written", 3 * new * h * 2),
                                       routing))]
            layer += [Linear(f"{p}.mlp.shared_experts.{n}", tokens=new, d_in=a, d_out=b) for n, a, b in
                      (("gate_proj", h, si), ("up_proj", h, si), ("down_proj", si, h))]
            layer.insert(-1, gated(f"{p}.mlp.shared_experts.act", new, si))
        layer.append(residual(f"{p}.residual", 2, new, h))
        kids.append(Block(p, children=layer))
    kids.insert(0, Embedding(f"{prefix}.embed_tokens", tokens=new, d=h, vocab=spec.vocab))
    if spec.inv_freq:  # the positions (cache_position offset) and the angles, once per forward
        # an eager or flex mask: its query and key positions too (adds the trace cannot tell from these)
        eager = (("the mask's positions", new + kv_len),) if spec.attn_op in ("bmm", "flex") else ()
        kids.insert(1, rope_angles(f"{prefix}.rotary_emb.inv_freq", new, hd, ("positions", new), *eager))
    mask = _causal_mask(spec, new, kv_len)
    if mask:  # v1's positions are made there too (v2's with the RoPE angles)
        kids.insert(1, Elementwise(f"{prefix}.causal_mask", elements=mask, per_element=1,
                                   glue=() if spec.inv_freq else (("positions", new),),
                                   traffic=(("the mask written", new * kv_len * 2),) if spec.transformers_446 else ()))
    if spec.transformers_446:
        kids.insert(1, Layout(f"{prefix}.positions", traffic=(("the positions written (int64)", new * 8),)))
    kids.append(rms_norm(f"{prefix}.norm", new, h))
    kids.append(Linear("lm_head", tokens=logits, d_in=h, d_out=spec.vocab))
    if spec.transformers_446:  # DeepseekOCRForCausalLM.forward: logits.float()
        kids.append(Layout("logits", traffic=(("the logits read, and written as float32", logits * spec.vocab * (2 + 4)),)))
    return Block(prefix, children=kids)


def _attention_traffic(spec: DecoderSpec, new: int, kv_len: int) -> tuple[tuple[str, int], ...]:
    """transformers 4.46's eager LlamaAttention, fused: it reads q and k (RoPE applied inside), cos and sin, the mask,
    and the keys and values it attends to (the first forward: its own roped keys and v; then the grown cache); it
    writes its output (transposed back) and the roped keys the cache keeps. Other implementations: the formula's."""
    if not (spec.transformers_446 and spec.attn_op == "bmm"):
        return ()
    q, kv = new * spec.heads * spec.head_dim * 2, new * spec.kv_heads * spec.head_dim * 2
    attended = (("v read", kv),) if kv_len == new else (("the cached keys and values read", 2 * kv_len * spec.kv_heads * spec.head_dim * 2),)
    mask = (("the mask read", new * kv_len * 2),) if new > 1 or spec.one_token_mask else ()
    return (("q and k read", q + kv), ("cos and sin read", 2 * new * spec.head_dim * 2), *attended, *mask,
            ("the output and the roped keys written", q + kv))


def _attention_glue(spec: DecoderSpec, new: int, kv_len: int) -> tuple[tuple[str, int], ...]:
    """v1 applies RoPE in the attention (`rope_apply_apart`); eager attention scales and masks (`_eager_glue`)."""
    glue: list[tuple[str, int]] = []
    if not spec.rope_apply_apart:
        e = new * spec.head_dim * (spec.heads + spec.kv_heads)
        glue.append(("RoPE applied to q and k", 3 * e + e // 2))
    return (*glue, *_eager_glue(spec.attn_op, spec.heads * new * kv_len, masked=new > 1 or spec.one_token_mask))


FLEX_BLOCK = 128  # torch's create_block_mask default, which transformers' flex mask uses


def _causal_mask(spec: DecoderSpec, new: int, kv_len: int) -> int:
    """The decoder's mask, made once per forward by the attention implementations that need one: eager compares
    positions and fills (2 per (query, key) pair; v1 none for a one-token step); flex evaluates its mask function
    over every pair, sums it per 128 x 128 block over the padded grid and classifies the blocks (12 ops per block)."""
    if spec.attn_op == "bmm":
        return 2 * new * kv_len if new > 1 or spec.one_token_mask else 0
    if spec.attn_op == "flex":
        nq, nk = -(-new // FLEX_BLOCK), -(-kv_len // FLEX_BLOCK)
        return new * kv_len + nq * nk * FLEX_BLOCK * FLEX_BLOCK + 12 * nq * nk
    return 0


def _eager_glue(attn_op: str, scores: int, masked: bool) -> tuple[tuple[str, int], ...]:
    """Eager attention scales its scores and adds the mask before the softmax the Attention layer counts (one new
    token attends to every position: no mask)."""
    if attn_op != "bmm":
        return ()
    return (("scores scaled", scores), *((("mask added", scores),) if masked else ()))


def _routing_glue(spec: DecoderSpec, new: int, rows: int) -> tuple[tuple[str, int], ...]:
    """The experts' work around their GEMMs: the implementation's bookkeeping (ROUTING_BOOKKEEPING), each row's output
    scaled by its routing weight, the top-k summed per token and the shared experts' output added."""
    book = ROUTING_BOOKKEEPING[spec.experts_op](rows, spec.experts)
    return (*book, ("routing weights applied", rows * spec.hidden), ("top-k summed", rows * spec.hidden),
            ("added to the shared experts", new * spec.hidden))


#: per op carrying the experts' GEMMs, their bookkeeping: transformers 5's grouped_mm counts the rows per expert
#: (histc, the rows' expert index, the offsets' cumsum); batched_mm (bmm) gathers each row's expert weights (none);
#: v1's moe_infer loop (mm) indexes the rows' tokens (a floor divide; transformers 5's eager loop, --mode real, routes
#: by the data and is not modelled here)
ROUTING_BOOKKEEPING = {
    "grouped_mm": lambda rows, experts: (("rows per expert and offsets", 2 * rows + experts),),
    "bmm": lambda rows, experts: (),
    "mm": lambda rows, experts: (("the rows' token index", rows),),
}


def stage_blocks(model: str, views: Views, vision: Block, spec: DecoderSpec, prompt_len: int, steps: int,
            all_logits: bool, variant: Variant, merge: tuple[Layer, ...] = ()) -> ModelTree:
    """`merge`: what the model reads where it merges the image tokens into the prompt (separator embeddings)."""
    tree = ModelTree(model, views, prompt_len)
    tree.stages["vision"] = [vision]
    tree.stages["prefill"] = [Block("prefill", children=[vision, *merge, decoder(spec, "decoder", prompt_len, prompt_len,
                                                                                 prompt_len if all_logits else 1)])]
    grow = 1 if variant.decode_kv_growth else 0
    step = lambda k: decoder(spec, "decoder", 1, prompt_len + grow * (k + 1), 1)  # noqa: E731
    if steps >= CLOSED_FORM_STEPS:  # step 0 apart (the trace's first forward is its own), then 1..n-1 in closed form
        tree.stages["decode"] = [step(0), Steps("decode", build=step, first=1, last=steps - 1)]
    else:
        tree.stages["decode"] = [step(k) for k in range(steps)]
    return tree


def decoder_spec(lang: dict, where: str, **kw) -> DecoderSpec:
    get = lambda k: config_value(lang, k, where)  # noqa: E731
    n = get("num_hidden_layers")
    if "mlp_layer_types" in lang:
        dense = tuple(t == "dense" for t in lang["mlp_layer_types"])
    else:
        dense = tuple(i < get("first_k_dense_replace") for i in range(n))
    heads = get("num_attention_heads")
    return DecoderSpec(hidden=get("hidden_size"), heads=heads, kv_heads=get("num_key_value_heads"),
                       head_dim=lang.get("head_dim") or get("hidden_size") // heads,
                       dense_inter=get("intermediate_size"), moe_inter=get("moe_intermediate_size"),
                       experts=get("n_routed_experts"), top_k=get("num_experts_per_tok"), shared=get("n_shared_experts"),
                       vocab=get("vocab_size"), dense_layers=dense, **kw)
