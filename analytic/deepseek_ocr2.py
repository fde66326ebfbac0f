"""DeepSeek-OCR-2's layer tree per stage, from its config.json and a workload (SAM ViT-B + the Qwen2-style encoder
with learned queries per view, the projector, the DeepSeek-V2 decoder)."""

from __future__ import annotations

from analytic.blocks import VENDOR_CONSTANTS, attention_op, config_value, decoder_spec, qwen2_encoder, sam, stage_blocks
from analytic.layers import Block, Buffer, Elementwise, Layer, Linear
from analytic.request import ModelTree, Shape, Variant
from analytic.shapes import v2_views

#: transformers' experts implementations -> the op that carries their GEMMs (Layer.op)
EXPERTS_OPS = {"grouped_mm": "grouped_mm", "batched_mm": "bmm", "eager": "mm"}


def build_v2(cfg: dict, shape: Shape, where: str = "config", variant: Variant = Variant(),
             attention: dict[str, str] | None = None) -> ModelTree:
    """`attention`: the implementations of the decoder and the vision tower (SAM and encoder; default sdpa) and of the
    experts (default grouped_mm)."""
    experts_op = EXPERTS_OPS.get((attention or {}).get("experts", "grouped_mm"), "grouped_mm")
    c = VENDOR_CONSTANTS["deepseek-ocr-2"]
    s = config_value(cfg, "vision_config.sam_config", where)
    enc = config_value(cfg, "vision_config.encoder_config", where)
    views = v2_views(shape.width, shape.height, shape.base_size, shape.tile_size, shape.crop_mode, c["patch"], c["downsample"])
    text = config_value(cfg, "text_config", where)
    vision_op = attention_op((attention or {}).get("vision", "sdpa"))

    def view(name: str, count: int, px: int) -> list[Layer]:
        n = (px // c["patch"] // 4) ** 2
        return [sam(f"vision.{name}.sam", count, px, config_value(s, "hidden_size", where), config_value(s, "num_hidden_layers", where),
                    s.get("num_attention_heads", 12), config_value(s, "global_attn_indexes", where),
                    s.get("mlp_dim") or int(config_value(s, "hidden_size", where) * s.get("mlp_ratio", c["sam_mlp_ratio"])),
                    s.get("output_channels", c["neck"]), config_value(s, "downsample_channels", where), c, vision_op),
                qwen2_encoder(f"vision.{name}.encoder", count, n, enc, enc.get("head_dim") or enc["hidden_size"] // enc["num_attention_heads"],
                              variant.clip_layers, vision_op),
                projector(f"vision.{name}.projector", count, variant.projector_tokens or n, enc["hidden_size"],
                          config_value(text, "hidden_size", where))]

    kids = view("global", 1, views.global_px)
    if views.tiles and not variant.single_view:
        kids += view("tiles", views.tiles, views.tile_px)
    prompt = 1 + views.image_tokens + shape.text_tokens
    spec = decoder_spec(text, where, rope_per_layer=False, attn_op=attention_op((attention or {}).get("decoder", "sdpa")),
                         experts_op=experts_op, router_bytes=4, inv_freq=True)  # transformers 5: an fp32 router
    return stage_blocks("deepseek-ocr-2", views, Block("vision", children=kids), spec,
                   prompt, shape.decode_steps, all_logits=False, variant=variant,
                   merge=merge(views.image_tokens, prompt, config_value(text, "hidden_size", where)))


def merge(image_tokens: int, prompt: int, hidden: int) -> tuple[Layer, ...]:
    """Where the image tokens join the prompt: the views' tokens and the separator concatenated into the image
    features (view_separator); get_placeholder_mask finds and counts the image-token positions in the ids (and checks
    the count), and masked_scatter writes the features into the prompt's embeddings (image_mask)."""
    return (Buffer("view_separator", elements=hidden, dtype_bytes=2,
                   traffic=(("the views' tokens read", (image_tokens - 1) * hidden * 2),
                            ("the image features written", image_tokens * hidden * 2))),
            Elementwise("image_mask", elements=2 * prompt + 2, per_element=1, dtype_bytes=1,
                        traffic=(("the ids read", 8 * prompt), ("the features and the embeddings read, the prompt's "
                                                                "embeddings written", (image_tokens + 2 * prompt) * hidden * 2))))


def projector(lid: str, views: int, tokens: int, d_in: int, d_out: int) -> Linear:
    """The linear projector; on a batch of tiles its input is a strided slice (the queries' half of each view), which
    F.linear cannot fold into one addmm: it runs a bmm and adds the bias apart."""
    if views == 1:
        return Linear(lid, op="addmm", tokens=tokens, d_in=d_in, d_out=d_out, bias=True)
    return Linear(lid, op="addmm", tokens=views * tokens, d_in=d_in, d_out=d_out, bias=True,
                  glue=(("bias added apart (a strided batch)", views * tokens * d_out),),
                  traffic=(("the queries' halves read (the span of the slice)", (2 * views - 1) * tokens * d_in * 2),
                           ("the output written", views * tokens * d_out * 2)))
