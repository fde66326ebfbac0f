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

    # (name, count, pixels) per view kind; the vendor runs the tiles first
    shown = [("tiles", views.tiles, views.tile_px)] if views.tiles and not variant.single_view else []
    shown.append(("global", 1, views.global_px))
    kids = [layer for name, count, px in shown for layer in view(name, count, px)]
    spec = decoder_spec(lang, where, rope_per_layer=True, attn_op=attention_op((attention or {}).get("decoder", "eager")),
                         experts_op="mm", rope_apply_apart=False, one_token_mask=False, transformers_446=True)
    prompt = 1 + views.image_tokens + shape.text_tokens
    return stage_blocks("deepseek-ocr", views, Block("vision", children=kids), spec, prompt, shape.decode_steps,
                        all_logits=True, variant=variant,
                        merge=(_image_merge(shown, c, clip_cfg["width"], n_proj_in, n_embed, prompt),))


def _image_merge(views: list[tuple[str, int, int]], c: dict, clip_width: int, proj_in: int, n_embed: int,
                 prompt: int) -> Buffer:
    """DeepseekOCRModel.forward between the encoders and the decoder, per view kind (name, count, pixels): CLIP's
    tokens (its class token sliced off) and SAM's features joined for the projector (a cat), the projected grid with
    image_newline ending each row (tiles: their grid laid out first, a copy), then view_seperator after them all (one
    layer, as the trace sees them: each read where a cat joins the tokens), scattered into the prompt's embeddings in
    place (masked_scatter_)."""
    traffic: list[tuple[str, int]] = []
    projected = 0
    for name, count, px in views:
        n = (px // c["patch"] // c["downsample"]) ** 2  # SAM's tokens per view: CLIP's, less its class token
        traffic += [(f"{name}: CLIP's tokens (from the second) and SAM's features read",
                     ((count * (n + 1) - 1) * clip_width + count * n * (proj_in - clip_width)) * 2),
                    (f"{name}: the projector's input written", count * n * proj_in * 2)]
        projected += count * n
    traffic += [("the projected tokens read", projected * n_embed * 2),
                ("the image-token mask read (bool)", prompt),
                ("the prompt's embeddings merged in place (written)", prompt * n_embed * 2)]
    return Buffer("image_merge", elements=2 * n_embed, dtype_bytes=2, reads=n_embed * (len(views) + 1),
                  traffic=tuple(traffic))
