"""Model builders: the layer tree of DeepSeek-OCR (v1) and DeepSeek-OCR-2 per stage, from the vendor
config.json and a workload. Architecture numbers come from the config; the few the vendor code hard-codes
(and the config does not carry) are in `VENDOR_CONSTANTS`, each with the file that fixes it.

Stages: `vision` (every view through the vision encoders and the projector), `prefill` (vision + the
decoder over the prompt + lm_head), `decode` (one Block per one-token step, KV length growing).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from analytic.layers import Attention, Block, Conv2d, Elementwise, Experts, KVCache, Layer, Linear, RelPos, Rope
from analytic.shapes import Views, v1_views, v2_views
from tracer.core.configfile import dig
from tracer.core.errors import FlopdiffError
from tracer.core.workload import MAX_PIXELS, MAX_SIDE

# Numbers the vendor code fixes outside config.json (v1: deepencoder.py build_sam_vit_b / build_clip_l;
# v2: transformers DeepseekOcr2SamVisionConfig defaults, checked against transformers in the tests).
VENDOR_CONSTANTS = {
    "deepseek-ocr": {"patch": 16, "window": 14, "sam_mlp_ratio": 4, "neck": 256, "clip_ffn": 4096, "downsample": 4},
    "deepseek-ocr-2": {"patch": 16, "window": 14, "sam_mlp_ratio": 4.0, "neck": 256, "downsample": 4},
}


@dataclass(frozen=True)
class Shape:
    """What a builder needs of the workload (the tracer's Workload maps onto it one to one)."""

    width: int
    height: int
    base_size: int
    tile_size: int
    crop_mode: bool
    text_tokens: int
    decode_steps: int

    def __post_init__(self) -> None:
        """API input is checked here, by field name (the command lines check their flags before)."""
        _require(self, {"width": _positive, "height": _positive, "base_size": _view, "tile_size": _view,
                        "crop_mode": _bool, "text_tokens": _count, "decode_steps": _count})

        if max(self.width, self.height) > MAX_SIDE or self.width * self.height > MAX_PIXELS:
            raise FlopdiffError(f"image_wh ({self.width}, {self.height}): over {MAX_SIDE} px on a side or "
                                f"{MAX_PIXELS // 1_000_000} Mpx; give the real page size")


@dataclass(frozen=True)
class Variant:
    """Deviations from the vendor (presets/*.yaml): `aligned` has none; `seed-naive` has all."""

    single_view: bool = False
    clip_layers: int | None = None
    projector_tokens: int | None = None
    decode_kv_growth: bool = True

    def __post_init__(self) -> None:
        _require(self, {"single_view": _bool, "clip_layers": _optional(_count), "projector_tokens": _optional(_positive),
                        "decode_kv_growth": _bool}, where="preset")


@dataclass(frozen=True)
class Effect:
    """What one preset setting does to the model, by the layer ids it touches: the reports name it as the cause of
    those layers' gaps. `pattern` is a regex over layer ids; `index` (a group of the pattern) is compared with the
    setting's value when `from_index` (a layer from that index on is left out)."""

    setting: str
    pattern: str
    says: str
    stages: tuple[str, ...] = ("vision", "prefill", "decode")
    from_index: bool = False


# A setting is active when it differs from the aligned (vendor-exact) default.
VARIANT_EFFECTS = (
    Effect("single_view", r"vision\.tiles\.", "tile views not modelled"),
    Effect("clip_layers", r"vision\.\w+\.(?:clip|encoder)\.layers\.(?P<index>\d+)\.",
           "encoder blocks from this index on not modelled", from_index=True),
    Effect("projector_tokens", r"vision\.\w+\.projector$", "projector on a fixed token count"),
    Effect("decode_kv_growth", r"decoder\.layers\.\d+\.attn$", "KV cache not grown per decode step",
           stages=("decode",)),
)


def variant_cause(variant: Variant, stage: str, layer_id: str) -> str | None:
    """The preset setting behind a layer's gap, as `setting: value (what it does)`, or None."""
    default = Variant()
    for e in VARIANT_EFFECTS:
        value = getattr(variant, e.setting)
        if value == getattr(default, e.setting) or stage not in e.stages:
            continue
        m = re.search(e.pattern, layer_id)
        if m and (not e.from_index or int(m.group("index")) >= value):
            shown = str(value).lower() if isinstance(value, bool) else value
            return f"preset {e.setting}: {shown} ({e.says})"
    return None


# ---- field rules: (test, what the value must be) -------------------------------------------------------------

_positive = (lambda v: type(v) is int and v > 0, "a positive integer")
_count = (lambda v: type(v) is int and v >= 0, "an integer >= 0")
_bool = (lambda v: type(v) is bool, "true or false")
_view = (lambda v: type(v) is int and v >= 64 and v % 16 == 0, "a multiple of the patch size 16, at least 64")


def _optional(rule: tuple) -> tuple:
    test, what = rule
    return (lambda v: v is None or test(v), f"null or {what}")


def _require(obj: Any, rules: dict[str, tuple], where: str = "") -> None:
    for name, (test, what) in rules.items():
        value = getattr(obj, name)
        if not test(value):
            raise FlopdiffError(f"{where + ' ' if where else ''}{name} = {value!r}: must be {what}")


@dataclass
class ModelTree:
    model: str
    views: Views
    prompt_len: int
    stages: dict[str, list[Block]] = field(default_factory=dict)  # decode: one Block per step


def _dig(cfg: dict, dotted: str, where: str) -> Any:
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


# ---- vision encoders -------------------------------------------------------------------------------

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
    win = c["window"]
    d = width // heads
    kids: list[Layer] = [Conv2d(f"{prefix}.patch_embed", batch=views, c_in=3, c_out=width, kernel=c["patch"], out_hw=(g, g))]
    for i in range(layers):
        p = f"{prefix}.blocks.{i}"
        if i in global_idx:
            batch, side = views, g
        else:
            gp = -(-g // win) * win
            batch, side = views * (gp // win) ** 2, win
        tokens = batch * side * side
        kids.append(Block(p, children=[
            Elementwise(f"{p}.norm1", elements=views * g * g * width, per_element=4),
            Linear(f"{p}.qkv", op="addmm", tokens=tokens, d_in=width, d_out=3 * width),
            RelPos(f"{p}.rel_pos", batch_heads=batch * heads, h=side, w=side, d=d),
            Attention(f"{p}.attn", op=attn_op, batch=batch, heads=heads, s_q=side * side, s_k=side * side, d=d, d_v=d),
            Linear(f"{p}.proj", op="addmm", tokens=tokens, d_in=width, d_out=width),
            Elementwise(f"{p}.norm2", elements=views * g * g * width, per_element=4),
            Linear(f"{p}.mlp.lin1", op="addmm", tokens=views * g * g, d_in=width, d_out=mlp),
            Elementwise(f"{p}.mlp.act", elements=views * g * g * mlp, per_element=8),
            Linear(f"{p}.mlp.lin2", op="addmm", tokens=views * g * g, d_in=mlp, d_out=width),
        ]))
    kids += [Conv2d(f"{prefix}.neck.conv1", batch=views, c_in=width, c_out=neck, kernel=1, out_hw=(g, g)),
             Conv2d(f"{prefix}.neck.conv2", batch=views, c_in=neck, c_out=neck, kernel=3, out_hw=(g, g)),
             Conv2d(f"{prefix}.net_2", batch=views, c_in=neck, c_out=down[0], kernel=3, out_hw=(g // 2, g // 2)),
             Conv2d(f"{prefix}.net_3", batch=views, c_in=down[0], c_out=down[1], kernel=3, out_hw=(g // 4, g // 4))]
    return Block(prefix, children=kids)


@_shared
def clip(prefix: str, views: int, tokens: int, width: int, layers: int, heads: int, ffn: int) -> Block:
    """v1's CLIP-L on SAM features (its patch embedding replaced), class token included in `tokens`."""
    t = views * tokens
    d = width // heads
    return Block(prefix, children=[Block(f"{prefix}.layers.{i}", children=[
        Linear(f"{prefix}.layers.{i}.qkv", op="addmm", tokens=t, d_in=width, d_out=3 * width),
        Attention(f"{prefix}.layers.{i}.attn", batch=views, heads=heads, s_q=tokens, s_k=tokens, d=d, d_v=d),
        Linear(f"{prefix}.layers.{i}.out_proj", op="addmm", tokens=t, d_in=width, d_out=width),
        Linear(f"{prefix}.layers.{i}.mlp.fc1", op="addmm", tokens=t, d_in=width, d_out=ffn),
        Linear(f"{prefix}.layers.{i}.mlp.fc2", op="addmm", tokens=t, d_in=ffn, d_out=width),
    ]) for i in range(layers)])


@_shared
def qwen2_encoder(prefix: str, views: int, n: int, enc: dict, head_dim: int, layers: int | None = None,
                  attn_op: str = "sdpa") -> Block:
    """v2's Qwen2-style encoder over n SAM tokens + n learned queries (image tokens both ways, queries
    causal: counted dense, the mask is data to SDPA)."""
    s, h = 2 * n, enc["hidden_size"]
    heads, kv, inter = enc["num_attention_heads"], enc["num_key_value_heads"], enc["intermediate_size"]
    t = views * s
    kids: list[Layer] = []  # RoPE angles: a broadcast multiply in transformers 5, no matmul
    for i in range(layers or enc["num_hidden_layers"]):
        p = f"{prefix}.layers.{i}"
        kids.append(Block(p, children=[
            Linear(f"{p}.q_proj", op="addmm", tokens=t, d_in=h, d_out=heads * head_dim),
            Linear(f"{p}.k_proj", op="addmm", tokens=t, d_in=h, d_out=kv * head_dim),
            Linear(f"{p}.v_proj", op="addmm", tokens=t, d_in=h, d_out=kv * head_dim),
            Attention(f"{p}.attn", op=attn_op, batch=views, heads=heads, s_q=s, s_k=s, d=head_dim, d_v=head_dim,
                      causal=False),
            Linear(f"{p}.o_proj", tokens=t, d_in=heads * head_dim, d_out=h),
            Linear(f"{p}.mlp.gate_proj", tokens=t, d_in=h, d_out=inter),
            Linear(f"{p}.mlp.up_proj", tokens=t, d_in=h, d_out=inter),
            Linear(f"{p}.mlp.down_proj", tokens=t, d_in=inter, d_out=h),
        ]))
    return Block(prefix, children=kids)


# ---- decoder -----------------------------------------------------------------------------------------

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


def decoder(spec: DecoderSpec, prefix: str, new: int, kv_len: int, logits: int) -> Block:
    """The decoder over `new` tokens attending to `kv_len` positions (cache included), lm_head on `logits`."""
    h, hd = spec.hidden, spec.head_dim
    kids: list[Layer] = []
    for i, dense in enumerate(spec.dense_layers):
        p = f"{prefix}.layers.{i}"
        layer: list[Layer] = [
            Linear(f"{p}.q_proj", tokens=new, d_in=h, d_out=spec.heads * hd),
            Linear(f"{p}.k_proj", tokens=new, d_in=h, d_out=spec.kv_heads * hd),
            Linear(f"{p}.v_proj", tokens=new, d_in=h, d_out=spec.kv_heads * hd),
            Attention(f"{p}.attn", op=spec.attn_op, heads=spec.heads, s_q=new, s_k=kv_len, d=hd, d_v=hd, causal=True),
            Linear(f"{p}.o_proj", tokens=new, d_in=spec.heads * hd, d_out=h),
            KVCache(f"{p}.kv_cache", positions=kv_len, kv_heads=spec.kv_heads, d=hd),
        ]
        if spec.rope_per_layer:
            layer.insert(3, Rope(f"{p}.rope", positions=new, half_dim=hd // 2))
        if dense:
            layer += [Linear(f"{p}.mlp.{n}", tokens=new, d_in=a, d_out=b) for n, a, b in
                      (("gate_proj", h, spec.dense_inter), ("up_proj", h, spec.dense_inter), ("down_proj", spec.dense_inter, h))]
        else:
            si = spec.moe_inter * spec.shared
            layer += [Linear(f"{p}.mlp.gate", tokens=new, d_in=h, d_out=spec.experts),
                      Experts(f"{p}.mlp.experts", op=spec.experts_op, routed_rows=new * spec.top_k, d=h,
                              inter=spec.moe_inter, n_experts=spec.experts)]
            layer += [Linear(f"{p}.mlp.shared_experts.{n}", tokens=new, d_in=a, d_out=b) for n, a, b in
                      (("gate_proj", h, si), ("up_proj", h, si), ("down_proj", si, h))]
        kids.append(Block(p, children=layer))
    kids.append(Linear("lm_head", tokens=logits, d_in=h, d_out=spec.vocab))
    return Block(prefix, children=kids)


def _stages(model: str, views: Views, vision: Block, spec: DecoderSpec, prompt_len: int, steps: int,
            all_logits: bool, variant: Variant) -> ModelTree:
    tree = ModelTree(model, views, prompt_len)
    tree.stages["vision"] = [vision]
    tree.stages["prefill"] = [Block("prefill", children=[vision, decoder(spec, "decoder", prompt_len, prompt_len,
                                                                         prompt_len if all_logits else 1)])]
    grow = 1 if variant.decode_kv_growth else 0
    tree.stages["decode"] = [decoder(spec, "decoder", 1, prompt_len + grow * (k + 1), 1) for k in range(steps)]
    return tree


# ---- DeepSeek-OCR (v1) ---------------------------------------------------------------------------------

def build_v1(cfg: dict, shape: Shape, where: str = "config", variant: Variant = Variant(),
             attention: dict[str, str] | None = None) -> ModelTree:
    """`attention`: the decoder's implementation (eager or flash_attention_2; SAM and CLIP always call SDPA)."""
    c = VENDOR_CONSTANTS["deepseek-ocr"]
    sam_cfg = _dig(cfg, "vision_config.width.sam_vit_b", where)
    clip_cfg = _dig(cfg, "vision_config.width.clip-l-14-224", where)
    lang = _dig(cfg, "language_config", where)
    views = v1_views(shape.width, shape.height, shape.base_size, shape.tile_size, shape.crop_mode, c["patch"], c["downsample"])
    n_proj_in, n_embed = _dig(cfg, "projector_config.input_dim", where), _dig(cfg, "projector_config.n_embed", where)

    def view(name: str, count: int, px: int) -> list[Layer]:
        sam_tokens = (px // c["patch"] // 4) ** 2
        return [sam(f"vision.{name}.sam", count, px, sam_cfg["width"], sam_cfg["layers"], sam_cfg["heads"],
                    sam_cfg["global_attn_indexes"], sam_cfg["width"] * c["sam_mlp_ratio"], c["neck"],
                    sam_cfg["downsample_channels"], c),
                clip(f"vision.{name}.clip", count, sam_tokens + 1, clip_cfg["width"],
                     variant.clip_layers or clip_cfg["layers"], clip_cfg["heads"], c["clip_ffn"]),
                Linear(f"vision.{name}.projector", op="addmm", tokens=count * (variant.projector_tokens or sam_tokens),
                       d_in=n_proj_in, d_out=n_embed)]

    kids = view("global", 1, views.global_px)
    if views.tiles and not variant.single_view:
        kids = view("tiles", views.tiles, views.tile_px) + kids  # the vendor runs the tiles first
    spec = _decoder_spec(lang, where, rope_per_layer=True, attn_op=attention_op((attention or {}).get("decoder", "eager")),
                         experts_op="mm")
    return _stages("deepseek-ocr", views, Block("vision", children=kids), spec,
                   1 + views.image_tokens + shape.text_tokens, shape.decode_steps, all_logits=True, variant=variant)


def _decoder_spec(lang: dict, where: str, **kw) -> DecoderSpec:
    get = lambda k: _dig(lang, k, where)  # noqa: E731
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


# ---- DeepSeek-OCR-2 ------------------------------------------------------------------------------------

def build_v2(cfg: dict, shape: Shape, where: str = "config", variant: Variant = Variant(),
             attention: dict[str, str] | None = None, experts_op: str = "grouped_mm") -> ModelTree:
    """`attention`: the implementations of the decoder and the vision tower (SAM and encoder; default sdpa)."""
    c = VENDOR_CONSTANTS["deepseek-ocr-2"]
    s = _dig(cfg, "vision_config.sam_config", where)
    enc = _dig(cfg, "vision_config.encoder_config", where)
    views = v2_views(shape.width, shape.height, shape.base_size, shape.tile_size, shape.crop_mode, c["patch"], c["downsample"])
    text = _dig(cfg, "text_config", where)
    vision_op = attention_op((attention or {}).get("vision", "sdpa"))

    def view(name: str, count: int, px: int) -> list[Layer]:
        n = (px // c["patch"] // 4) ** 2
        return [sam(f"vision.{name}.sam", count, px, _dig(s, "hidden_size", where), _dig(s, "num_hidden_layers", where),
                    s.get("num_attention_heads", 12), _dig(s, "global_attn_indexes", where),
                    s.get("mlp_dim") or int(_dig(s, "hidden_size", where) * s.get("mlp_ratio", c["sam_mlp_ratio"])),
                    s.get("output_channels", c["neck"]), _dig(s, "downsample_channels", where), c, vision_op),
                qwen2_encoder(f"vision.{name}.encoder", count, n, enc, enc.get("head_dim") or enc["hidden_size"] // enc["num_attention_heads"],
                              variant.clip_layers, vision_op),
                Linear(f"vision.{name}.projector", op="addmm", tokens=count * (variant.projector_tokens or n), d_in=enc["hidden_size"],
                       d_out=_dig(text, "hidden_size", where))]

    kids = view("global", 1, views.global_px)
    if views.tiles and not variant.single_view:
        kids += view("tiles", views.tiles, views.tile_px)
    spec = _decoder_spec(text, where, rope_per_layer=False, attn_op=attention_op((attention or {}).get("decoder", "sdpa")),
                         experts_op=experts_op)
    return _stages("deepseek-ocr-2", views, Block("vision", children=kids), spec,
                   1 + views.image_tokens + shape.text_tokens, shape.decode_steps, all_logits=False, variant=variant)


BUILDERS = {"deepseek-ocr": build_v1, "deepseek-ocr-2": build_v2}
