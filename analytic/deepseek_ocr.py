"""DeepSeek-OCR (v1)'s layer tree per stage, from its config.json and a workload (SAM ViT-B + CLIP-L per view, the
projector, the DeepSeek-V2 decoder)."""

from __future__ import annotations

from analytic.blocks import VENDOR_CONSTANTS, attention_op, clip, config_value, decoder_spec, sam, stage_blocks
from analytic.layers import Block, Buffer, Layer, Linear
from analytic.request import ModelTree, Shape, Variant
from analytic.shapes import v1_views


def build_v1(cfg: dict, shape: Shape, where: str = "config", variant: Variant = Variant(),
             attention: dict[str, str] | None = None) -> ModelTree:
    """`attention`: the decoder's implementation (eager or flash_attention_2; SAM and CLIP always call SDPA)."""
    c = VENDOR_CONSTANTS["deepseek-ocr"]
    sam_cfg = config_value(cfg, "vision_config.width.sam_vit_b", where)
    clip_cfg = config_value(cfg, "vision_config.width.clip-l-14-224", where)
    lang = config_value(cfg, "language_config", where)
    views = v1_views(shape.width, shape.height, shape.base_size, shape.tile_size, shape.crop_mode, c["patch"], c["downsample"])
    n_proj_in, n_embed = config_value(cfg, "projector_config.input_dim", where), config_value(cfg, "projector_config.n_embed", where)

    def view(name: str, count: int, px: int) -> list[Layer]:
        sam_tokens = (px // c["patch"] // 4) ** 2
        return [sam(f"vision.{name}.sam", count, px, sam_cfg["width"], sam_cfg["layers"], sam_cfg["heads"],
                    sam_cfg["global_attn_indexes"], sam_cfg["width"] * c["sam_mlp_ratio"], c["neck"],
                    sam_cfg["downsample_channels"], c),
                clip(f"vision.{name}.clip", count, sam_tokens + 1, clip_cfg["width"],
                     variant.clip_layers or clip_cfg["layers"], clip_cfg["heads"], c["clip_ffn"],
                     (clip_cfg.get("image_size", 224) // clip_cfg.get("patch_size", 14)) ** 2 + 1),  # its position rows
                Linear(f"vision.{name}.projector", op="addmm", tokens=count * (variant.projector_tokens or sam_tokens),
                       d_in=n_proj_in, d_out=n_embed, bias=True)]

    kids = view("global", 1, views.global_px)
    if views.tiles and not variant.single_view:
        kids = view("tiles", views.tiles, views.tile_px) + kids  # the vendor runs the tiles first
    spec = decoder_spec(lang, where, rope_per_layer=True, attn_op=attention_op((attention or {}).get("decoder", "eager")),
                         experts_op="mm", rope_apply_apart=False, one_token_mask=False)
    return stage_blocks("deepseek-ocr", views, Block("vision", children=kids), spec,
                   1 + views.image_tokens + shape.text_tokens, shape.decode_steps, all_logits=True, variant=variant,
                   # image_newline ends the rows of each view kind's token grid, view_seperator follows them all: one
                   # layer, as the trace sees them (each read where a cat joins the tokens)
                   merge=(Buffer("image_separators", elements=2 * n_embed, dtype_bytes=2,
                                 reads=n_embed * (3 if views.tiles and not variant.single_view else 2)),))
