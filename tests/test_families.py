"""Any transformers model (tracer.vendors.hf, analytic.families, mapping/tables/hf.yaml): each family on a reduced
config of its own transformers class, checked against independent counts: FlopCounterMode run over the real model
(random weights) for policy torch, the trace for policy full (every stage and every layer, coverage 100%), and a
hand-derived formula on LlamaConfig()'s published 7B shape. A model of no family (Mamba, T5) is traced and counted
with an honest coverage table."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tracer.compare.analytic import analytic_for, report_shape
from tracer.core.errors import FlopdiffError
from tracer.core.models import FAMILIES, model_for_config
from tracer.core.workload import Workload
from tracer.pipeline import Options, run
from tracer.vendors import BuildOptions, check_model, get_vendor

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=512)


def _configs() -> dict:
    import transformers as t

    return {
        "llama": t.LlamaConfig(**SMALL),
        "mistral": t.MistralConfig(**SMALL),
        "qwen2": t.Qwen2Config(**SMALL),
        "qwen3": t.Qwen3Config(**SMALL, head_dim=32),
        "gemma": t.GemmaConfig(**SMALL, head_dim=32),
        "gemma2": t.Gemma2Config(**SMALL, head_dim=32),  # no sdpa (softcapping): transformers runs eager itself
        "mixtral": t.MixtralConfig(**SMALL, num_local_experts=4),
        "qwen3_moe": t.Qwen3MoeConfig(**SMALL, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                      head_dim=32),
        "qwen2_moe": t.Qwen2MoeConfig(**SMALL, moe_intermediate_size=64, shared_expert_intermediate_size=96,
                                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2),
        "deepseek_v3": t.DeepseekV3Config(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                                          num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                                          num_key_value_heads=4, n_routed_experts=8, n_group=2, topk_group=1,
                                          num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=48, kv_lora_rank=32,
                                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=512),
        "llava": t.LlavaConfig(image_token_id=500, text_config=dict(model_type="llama", **SMALL),
                               vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=56, patch_size=14)),
    }


KINDS = sorted(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "qwen3_moe", "qwen2_moe",
                "deepseek_v3", "llava"))  # _configs' keys (transformers 4.46, the v1 environment, lacks some classes)
WORKLOAD = dict(text_tokens=6, decode_steps=2)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-configs")
    paths = {}
    built = _configs()
    assert sorted(built) == KINDS
    for kind, config in built.items():
        paths[kind] = folder / f"{kind}.json"
        config.to_json_file(paths[kind])
    return paths


@pytest.fixture(scope="module")
def reports(configs):
    """Each family's fake-mode run through the whole pipeline, from its saved config alone (no --model)."""
    out = {}
    for kind, path in configs.items():
        model = model_for_config(str(path))
        assert model == f"hf:{kind}"
        out[kind] = run(Workload(model=model, **WORKLOAD), Options(config=str(path))).report
    return out


def test_every_family_is_a_row_of_the_table():
    described = {t for f in FAMILIES for t in f.model_types}
    assert set(KINDS) <= described


@pytest.mark.parametrize("kind", KINDS)
def test_aligned_has_no_gap_on_any_stage_or_layer_and_maps_every_node(reports, kind):
    r = reports[kind]
    assert r["coverage"]["unmapped"] == 0 and r["coverage"]["mapped"] == r["coverage"]["nodes_with_flops"] > 0
    for stage in r["stages"]:
        assert stage["gap"] == 0, (kind, stage["name"])
        assert stage["flops_analytic"] == stage["flops_full"]
    assert all(layer["metrics"]["tc_flops"]["gap"] == 0 for layer in r["layers"]), kind
    # the layers add up to the stages, and a decode layer is there for every step
    prefill = next(s for s in r["stages"] if s["name"] == "prefill")
    assert sum(x["flops_full"] for x in r["layers"] if x["stage"] == "prefill") == prefill["flops_full"] > 0
    assert r["gap_groups"] == []


def _flop_counter_stages(kind: str, path) -> dict[str, int]:
    """FlopCounterMode over the real model (random weights): the prefill, and the decode steps summed."""
    vendor = get_vendor(f"hf:{kind}")
    options = BuildOptions(mode="real")
    config = vendor.load_config(str(path), options)
    prepared = vendor.prepare(Workload(model=f"hf:{kind}", **WORKLOAD), config)
    torch.manual_seed(0)
    model = vendor.build(config, options)
    with torch.no_grad(), vendor.shims():
        with FlopCounterMode(display=False) as fc:
            out = vendor.prefill(model, prepared)()
        counts = {"prefill": fc.get_total_flops(), "decode": 0}
        for k in range(WORKLOAD["decode_steps"]):
            with FlopCounterMode(display=False) as fc:
                out = vendor.decode(model, out, k)()
            counts["decode"] += fc.get_total_flops()
    return counts


@pytest.mark.parametrize("kind", KINDS)
def test_policy_torch_equals_flopcountermode_on_the_real_model(reports, configs, kind):
    real = _flop_counter_stages(kind, configs[kind])
    r = reports[kind]
    traced = {s["name"]: s["flops_torch"] for s in r["stages"]}
    an = analytic_for(r["model"], report_shape(r["workload"]), "aligned", config=str(configs[kind]),
                      image_tokens=r["workload"]["image_tokens"], policy_name="torch",
                      attention=r["analytic"]["attention"])
    analytic = {s["name"]: s["flops"] for s in an.doc["stages"]}
    for stage in ("prefill", "decode"):
        assert traced[stage] == real[stage] == analytic[stage], (kind, stage)


def test_llama_7b_prefill_by_hand():
    """LlamaConfig()'s defaults (the published 7B shape), prefill of BOS + 15 tokens, counted by hand."""
    r = run(Workload(model="hf:llama", text_tokens=15, decode_steps=0), Options()).report
    h, layers, heads, kv, inter, vocab, t = 4096, 32, 32, 32, 11008, 32000, 16
    hd = h // heads
    per_layer = 2 * t * h * (heads * hd + 2 * kv * hd) + 2 * t * heads * hd * h + 3 * 2 * t * h * inter
    attention = 2 * heads * t * t * (hd + hd)  # scores and the weighted sum, dense (SDPA: the mask is data)
    expected = layers * (per_layer + attention) + 2 * 1 * h * vocab  # lm_head on the one kept logit
    prefill = next(s for s in r["stages"] if s["name"] == "prefill")
    assert prefill["flops_full"] == prefill["flops_analytic"] == expected
    assert prefill["kv_bytes"] == layers * 2 * t * kv * hd * 2  # bf16 keys and values


def test_a_model_without_sdpa_records_the_attention_it_ran(reports):
    r = reports["gemma2"]
    assert r["options"]["attn"] == "eager" and r["analytic"]["attention"]["decoder"] == "eager"
    assert {n["op"] for n in r["nodes"] if n.get("layer", "") and n["layer"].endswith(".attn") and n["flops_full"]} \
        == {"aten::bmm"}


def test_llava_image_tokens_follow_the_processor(reports):
    w = reports["llava"]["workload"]
    assert w["image_tokens"] == (56 // 14) ** 2  # the class token dropped (vision_feature_select_strategy default)
    assert w["prompt_len"] == 1 + w["image_tokens"] + WORKLOAD["text_tokens"]
    vision = next(s for s in reports["llava"]["stages"] if s["name"] == "vision")
    assert vision["flops_full"] == vision["flops_analytic"] > 0


@pytest.mark.parametrize("kind,config", [
    ("mamba", dict(hidden_size=64, num_hidden_layers=2, vocab_size=512, state_size=8)),
    ("t5", dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512)),
])
def test_a_model_of_no_family_is_traced_and_counted_honestly(tmp_path, kind, config):
    import transformers

    path = tmp_path / f"{kind}.json"
    transformers.AutoConfig.for_model(kind, **config).to_json_file(path)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "tracer.diff", "--config", str(path), "--text-tokens", "6",
                        "--decode-steps", "2", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["model"] == f"hf:{kind}"
    cov = r["coverage"]
    assert cov["nodes_with_flops"] == cov["unmapped"] > 0 and cov["mapped"] == 0
    assert all(s["flops_full"] > 0 and s["flops_analytic"] == 0 for s in r["stages"] if s["name"] != "vision")
    unmapped = [n for n in r["nodes"] if n.get("unmapped")]
    assert all("no analytic family describes this model type" in n["unmapped"] for n in unmapped)
    assert "by module class: Linear" in p.stdout and "no analytic layer has a gap" in p.stdout


def test_model_names_and_configs_are_checked():
    check_model("hf:llama")
    with pytest.raises(FlopdiffError, match="no model type 'lama'"):
        check_model("hf:lama")
    with pytest.raises(FlopdiffError, match="unknown model.*hf:MODEL_TYPE"):
        check_model("llama")


def test_a_config_for_another_model_type_is_refused(configs):
    p = subprocess.run([sys.executable, "-m", "tracer.diff", "--model", "hf:mistral", "--config",
                        str(configs["llama"]), "--quiet"], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "its model_type is 'llama', not 'mistral'" in p.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_the_generic_table_maps_every_module_the_parallel_plans_name(reports, kind):
    """The roles transformers declares (the config class's tensor- and expert-parallel plans: module-path globs
    per projection and for the experts; LLaVA's are its text config's) each resolve, wherever such a module runs,
    to an analytic layer named after the role (`decoder.layers.N.<role>`, attention projections without `self_attn`)."""
    import fnmatch

    from tracer.core.models import family_of

    config = _configs()[kind]
    text = config.get_text_config()
    plans = {**(type(text).base_model_tp_plan or {}), **(getattr(type(text), "base_model_ep_plan", None) or {})}
    prefix = family_of(kind).text
    nodes = [n for n in reports[kind]["nodes"] if n["flops_full"] and n["module"].startswith(prefix + ".layers.")]
    checked = 0
    for glob in plans:
        # a plan key naming a parameter (experts.gate_up_proj) is its module's: the experts
        module_glob = glob.rsplit(".", 1)[0] if glob.endswith(("experts.gate_up_proj", "experts.down_proj")) else glob
        under = [n for n in nodes if fnmatch.fnmatchcase(n["module"], f"{prefix}.{module_glob}")]
        role = module_glob.split(".", 2)[2].removeprefix("self_attn.")
        for n in under:
            assert n["layer"] and n["layer"].endswith("." + role), (kind, glob, n["module"], n["layer"])
        checked += len(under)
    assert checked > 0


@pytest.mark.v1
def test_on_transformers_4_the_dense_family_is_exact_and_a_value_reading_model_says_what_to_do(tmp_path):
    """transformers 4.46 (the v1 environment): Llama's RoPE angles are a matmul there (the family follows), its
    logits kept by num_logits_to_keep; Mixtral's per-expert loop reads the routing, which fake mode cannot see: one
    clear error naming the op and what to do, exit 2."""
    import transformers

    llama, mixtral = tmp_path / "llama.json", tmp_path / "mixtral.json"
    transformers.LlamaConfig(**SMALL).to_json_file(llama)
    transformers.MixtralConfig(**SMALL, num_local_experts=4).to_json_file(mixtral)
    r = run(Workload(model="hf:llama", **WORKLOAD), Options(config=str(llama))).report
    assert all(s["gap"] == 0 and s["flops_full"] == s["flops_analytic"] for s in r["stages"])
    assert r["coverage"]["unmapped"] == 0
    assert any(n["op"] == "aten::bmm" and n["layer"] == "decoder.rotary_emb.inv_freq" for n in r["nodes"])
    p = subprocess.run([sys.executable, "-m", "tracer.diff", "--config", str(mixtral), "--quiet"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "reads tensor values (aten.nonzero.default) under transformers 4.46" in p.stderr


def test_a_prompt_to_tokenize_is_refused_not_replaced_by_a_default_count(configs, tmp_path):
    p = subprocess.run([sys.executable, "-m", "tracer.diff", "--config", str(configs["llama"]), "--tokenizer",
                        str(tmp_path), "--prompt", "<image>\nFree OCR.", "--quiet"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--tokenizer/--prompt: not read for --model hf:llama" in p.stderr and "--text-tokens N" in p.stderr
