"""The refactor plan's naive analytic model of DeepSeek-OCR (v1), written outside flopdiff as a plug-in:

    flopdiff --model deepseek-ocr ... --analytic examples.naive_model:build

One 1024 x 1024 view (no tiles), 4 CLIP blocks, the projector on a fixed 256 tokens (the seed preset's count; the
plan writes 577, CLIP-L's 24 x 24 + 1 at 336 px: set PROJECTOR_TOKENS), the KV cache never grown while decoding. Its
layers are flopdiff's primitives (analytic.layers), their ids flopdiff's own mapping table's, so the built-in table
points the trace at them. It models tensor-core FLOPs, as the plan does: no norm, activation or layout copy.
"""

from analytic.layers import Attention, Block, Conv2d, Experts, Linear, RelPos, Rope

PATCH, WINDOW, CLIP_LAYERS, PROJECTOR_TOKENS, VIEW_PX = 16, 14, 4, 256, 1024


def sam(p: str, sam_cfg: dict) -> list:
    width, heads = sam_cfg["width"], sam_cfg["heads"]
    g = VIEW_PX // PATCH                                     # 64 x 64 patches
    padded = -(-g // WINDOW) * WINDOW                        # windows pad the grid to a multiple of 14
    kids = [Conv2d(f"{p}.patch_embed", batch=1, c_in=3, c_out=width, kernel=PATCH, out_hw=(g, g), bias=True,
                   stride=PATCH)]
    for i in range(sam_cfg["layers"]):
        if i in sam_cfg["global_attn_indexes"]:
            batch, side = 1, g
        else:
            batch, side = (padded // WINDOW) ** 2, WINDOW
        tokens = batch * side * side
        b = f"{p}.blocks.{i}"
        kids.append(Block(b, children=[
            Linear(f"{b}.qkv", op="addmm", tokens=tokens, d_in=width, d_out=3 * width, bias=True),
            RelPos(f"{b}.rel_pos", batch_heads=batch * heads, h=side, w=side, d=width // heads),
            Attention(f"{b}.attn", batch=batch, heads=heads, s_q=side * side, s_k=side * side, d=width // heads,
                      d_v=width // heads),
            Linear(f"{b}.proj", op="addmm", tokens=tokens, d_in=width, d_out=width, bias=True),
            Linear(f"{b}.mlp.lin1", op="addmm", tokens=g * g, d_in=width, d_out=4 * width, bias=True),
            Linear(f"{b}.mlp.lin2", op="addmm", tokens=g * g, d_in=4 * width, d_out=width, bias=True)]))
    down = sam_cfg["downsample_channels"]
    return kids + [Conv2d(f"{p}.neck.conv1", c_in=width, c_out=256, kernel=1, out_hw=(g, g)),
                   Conv2d(f"{p}.neck.conv2", c_in=256, c_out=256, kernel=3, out_hw=(g, g)),
                   Conv2d(f"{p}.net_2", c_in=256, c_out=down[0], kernel=3, out_hw=(g // 2, g // 2), stride=2),
                   Conv2d(f"{p}.net_3", c_in=down[0], c_out=down[1], kernel=3, out_hw=(g // 4, g // 4), stride=2)]


def clip(p: str, cfg: dict, tokens: int) -> list:
    w, heads = cfg["width"], cfg["heads"]
    return [Block(f"{p}.layers.{i}", children=[
        Linear(f"{p}.layers.{i}.qkv", op="addmm", tokens=tokens, d_in=w, d_out=3 * w, bias=True),
        Attention(f"{p}.layers.{i}.attn", heads=heads, s_q=tokens, s_k=tokens, d=w // heads, d_v=w // heads),
        Linear(f"{p}.layers.{i}.out_proj", op="addmm", tokens=tokens, d_in=w, d_out=w, bias=True),
        Linear(f"{p}.layers.{i}.mlp.fc1", op="addmm", tokens=tokens, d_in=w, d_out=4 * w, bias=True),
        Linear(f"{p}.layers.{i}.mlp.fc2", op="addmm", tokens=tokens, d_in=4 * w, d_out=w, bias=True),
    ]) for i in range(CLIP_LAYERS)]


def decoder(lang: dict, new: int, kv_len: int, logits: int) -> Block:
    h, heads, inter = lang["hidden_size"], lang["num_attention_heads"], lang["moe_intermediate_size"]
    hd = h // heads
    kids = []
    for i in range(lang["num_hidden_layers"]):
        p = f"decoder.layers.{i}"
        layer = [Linear(f"{p}.{n}_proj", tokens=new, d_in=h, d_out=h) for n in ("q", "k", "v", "o")]
        layer += [Rope(f"{p}.rope", positions=new, half_dim=hd // 2),
                  Attention(f"{p}.attn", op="bmm", heads=heads, s_q=new, s_k=kv_len, d=hd, d_v=hd, causal=True)]
        if i < lang["first_k_dense_replace"]:
            dense = lang["intermediate_size"]
            layer += [Linear(f"{p}.mlp.gate_proj", tokens=new, d_in=h, d_out=dense),
                      Linear(f"{p}.mlp.up_proj", tokens=new, d_in=h, d_out=dense),
                      Linear(f"{p}.mlp.down_proj", tokens=new, d_in=dense, d_out=h)]
        else:
            shared = inter * lang["n_shared_experts"]
            layer += [Linear(f"{p}.mlp.gate", tokens=new, d_in=h, d_out=lang["n_routed_experts"]),
                      Experts(f"{p}.mlp.experts", op="mm", routed_rows=new * lang["num_experts_per_tok"], d=h,
                              inter=inter, n_experts=lang["n_routed_experts"]),
                      Linear(f"{p}.mlp.shared_experts.gate_proj", tokens=new, d_in=h, d_out=shared),
                      Linear(f"{p}.mlp.shared_experts.up_proj", tokens=new, d_in=h, d_out=shared),
                      Linear(f"{p}.mlp.shared_experts.down_proj", tokens=new, d_in=shared, d_out=h)]
        kids.append(Block(p, children=layer))
    return Block("decoder", children=[*kids, Linear("lm_head", tokens=logits, d_in=h, d_out=lang["vocab_size"])])


def build(config: dict, workload, policy) -> dict:
    """flopdiff's plug-in contract (analytic.plugin): the vendor config, the workload, the counting policy."""
    widths = config["vision_config"]["width"]
    vision = Block("vision", children=[*sam("vision.global.sam", widths["sam_vit_b"]),
                                       *clip("vision.global.clip", widths["clip-l-14-224"], (VIEW_PX // 64) ** 2 + 1),
                                       Linear("vision.global.projector", op="addmm", tokens=PROJECTOR_TOKENS,
                                              d_in=config["projector_config"]["input_dim"],
                                              d_out=config["projector_config"]["n_embed"], bias=True)])
    lang, prompt = config["language_config"], workload.prompt_len
    return {"vision": [vision],
            "prefill": [Block("prefill", children=[vision, decoder(lang, prompt, prompt, prompt)])],
            "decode": [decoder(lang, 1, prompt, 1) for _ in range(workload.decode_steps)]}  # the KV cache not grown
