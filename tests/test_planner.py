"""The memory planner against the real thing: parameter shapes of our model built on the `meta`
device, per-rank shapes under TP, the KV cache the engine allocates and the memory a CPU run
uses, plus task=plan's verdicts, fixes and the `auto` limits."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from framework import FrameworkConfig
from framework.config.compose import compose
from framework.loader.resolve import load_hf_config, resolve_model_path
from framework.memory.activation import CUBLAS_WORKSPACE_BYTES
from framework.memory.planner import GiB, MemoryPlan, plan_memory, resolve_auto_limits

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "framework" / "assets" / "shapes"


def shape_config(name: str):
    return load_hf_config(SHAPES / name)


def plan_config(path: str, **cache) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path, cfg.model.dtype, cfg.model.load_format = path, "bfloat16", "dummy"
    for key, value in cache.items():
        setattr(cfg.cache, key, value)
    return cfg


def meta_model(hf_config, dtype=torch.bfloat16, max_model_len=0, tp: int = 1, quant=None):
    """Rank 0 of `tp`, built on `meta` exactly as the engine builds it (shapes, no memory)."""
    from framework.layers.quantization import QuantResolver
    from framework.models.context import ModelContext
    from framework.models.interface import build_model
    from framework.parallel import ParallelInfo
    ctx = ModelContext(hf_config, dtype, max_model_len, ParallelInfo(0, tp), quant or QuantResolver())
    return build_model(ctx, "meta")


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight counts once


def rotary_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith((".cos", ".sin")))


# --- shipped shapes ------------------------------------------------------------------------
@pytest.mark.parametrize("name,arch,model_type", [
    ("llama-3.1-8b", "LlamaForCausalLM", "llama"),
    ("qwen2.5-vl-3b", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
    ("granite-3.1-8b", "GraniteForCausalLM", "granite"),
    ("gemma-3-27b", "Gemma3ForConditionalGeneration", "gemma3"),
    ("fuyu-8b", "FuyuForCausalLM", "fuyu")])
def test_shipped_shapes_load_offline(name, arch, model_type):
    raw = json.loads((SHAPES / name / "config.json").read_text())
    assert raw["architectures"] == [arch] and raw["model_type"] == model_type
    hf = shape_config(name)
    assert hf.architectures == [arch] and hf.model_type == model_type
    assert resolve_model_path(name) == SHAPES / name


# --- weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8_030_261_248), ("granite-3.1-8b", 8_170_848_256)])
def test_weights_equal_meta_model(name, params):
    hf = shape_config(name)
    model = meta_model(hf, max_model_len=8192)
    plan = plan_memory(plan_config(name, max_model_len=8192), hf, 80 * GiB)
    assert param_bytes(model) == plan.weight_bytes == 2 * params  # the published parameter counts
    assert rotary_bytes(model) == plan.rotary_bytes


@pytest.mark.parametrize("name,tp", [("llama-3.1-8b", 2), ("llama-3.1-8b", 8), ("granite-3.1-8b", 2),
                                     ("granite-3.1-8b", 4)])
def test_weights_per_rank_equal_meta_model_under_tp(name, tp):
    hf = shape_config(name)
    model = meta_model(hf, tp=tp)
    cfg = plan_config(name, max_model_len=8192)
    cfg.parallelism.tensor_parallel_size = tp
    assert param_bytes(model) == plan_memory(cfg, hf, 80 * GiB).weight_bytes


def test_tp_slicing_by_hand():
    """Per-rank shapes written out, the way layers/linear.py and embedding.py slice them."""
    llama, granite = shape_config("llama-3.1-8b"), shape_config("granite-3.1-8b")
    # Llama-3.1-8B at TP=8: 4 query heads and 1 of the 8 KV heads per rank
    qkv = (4 + 2 * 1) * 128 * 4096
    o, gate_up, down = 4096 * 512, 2 * 1792 * 4096, 4096 * 1792
    layer = qkv + o + gate_up + down + 2 * 4096
    embed = 128256 // 8 * 4096  # 16032 rows: the vocab divides evenly
    expected = 2 * (32 * layer + 4096 + 2 * embed)
    cfg = plan_config("llama-3.1-8b", max_model_len=8192)
    cfg.parallelism.tensor_parallel_size = 8
    assert plan_memory(cfg, llama, 80 * GiB).weight_bytes == expected
    # Granite-3.1-8B at TP=2: vocab 49155 -> 24578 rows a rank (the last one zero-padded), tied lm_head
    qkv = (16 + 2 * 4) * 128 * 4096
    layer = qkv + 4096 * 2048 + 2 * 6400 * 4096 + 4096 * 6400 + 2 * 4096
    expected = 2 * (40 * layer + 4096 + 24578 * 4096)
    cfg = plan_config("granite-3.1-8b", max_model_len=8192)
    cfg.parallelism.tensor_parallel_size = 2
    assert plan_memory(cfg, granite, 80 * GiB).weight_bytes == expected


def test_qwen2_5_vl_weights_equal_hf_model():
    """Text decoder (Qwen2 biases on q/k/v, tied lm_head) and vision tower, against HF's own model."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from framework.memory.encoder import encoder_budget
    from framework.memory.shape import vision_shape
    hf = shape_config("qwen2.5-vl-3b")
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf)
    visual = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    text = sum(p.numel() for p in model.parameters()) - visual
    plan = plan_memory(plan_config("qwen2.5-vl-3b", max_model_len=4096), hf, 80 * GiB)
    assert plan.weight_bytes == 2 * text
    budget = encoder_budget(vision_shape(hf), {"image": 1}, {}, 2048, 4096, 2)
    assert budget.weight_bytes == 2 * visual


def test_quantized_weights_equal_meta_model():
    """fp8/int8 (1 byte + a float32 scale per row) and int4 (half a byte + a bf16 scale per group,
    and on CUDA its tinygemm copy unless int4_tinygemm=false), counted as measure.weight_bytes
    counts them: parameters plus the scales (persistent buffers). A GPU plan counts the model
    built for CUDA."""
    from framework.layers.quantization import QuantResolver
    from framework.memory.measure import weight_bytes
    hf = shape_config("llama-3.1-8b")
    planned = {}
    for method, tinygemm in (("fp8", True), ("int8", True), ("int4", True), ("int4", False)):
        cfg = plan_config("llama-3.1-8b", max_model_len=8192)
        cfg.quantization.method, cfg.quantization.int4_tinygemm = method, tinygemm
        model = meta_model(hf, quant=QuantResolver.build(cfg.quantization, hf, cuda=True))
        planned[method, tinygemm] = plan_memory(cfg, hf, 80 * GiB).weight_bytes
        assert weight_bytes(model) == planned[method, tinygemm], method
    # the copy: half a byte a weight of the 32 layers' linears, and a bf16 (scale, zero) per group
    linear_weights = 32 * 4096 * (6144 + 4096 + 2 * 14336) + 32 * 14336 * 4096
    assert planned["int4", True] - planned["int4", False] == linear_weights // 2 + linear_weights // 128 * 4


# --- KV cache ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,tp,kv_dtype,per_token", [
    ("llama-3.1-8b", 1, "auto", 2 * 32 * 8 * 128 * 2),
    ("llama-3.1-8b", 1, "fp8", 2 * 32 * 8 * 128 * 1),
    ("llama-3.1-8b", 2, "auto", 2 * 32 * 4 * 128 * 2),
    ("llama-3.1-8b", 16, "auto", 2 * 32 * 1 * 128 * 2),  # 8 KV heads on 16 ranks: each holds one, replicated
    ("qwen2.5-vl-3b", 4, "auto", 2 * 36 * 1 * 128 * 2),  # 2 KV heads on 4 ranks
    ("granite-3.1-8b", 1, "fp8", 2 * 40 * 8 * 128 * 1)])
def test_kv_bytes_per_token(name, tp, kv_dtype, per_token):
    hf = shape_config(name)
    cfg = plan_config(name, max_model_len=4096, kv_cache_dtype=kv_dtype)
    cfg.parallelism.tensor_parallel_size = tp
    plan = plan_memory(cfg, hf, 80 * GiB)
    assert plan.kv_bytes_per_token == per_token
    assert plan.kv_cache_bytes == plan.kv_blocks * cfg.cache.block_size * per_token
    # our model's own attention layers agree (the engine sizes its cache from them)
    from framework.engine.model_runner import kv_cache_dtype, kv_cache_spec
    from framework.models.interface import attention_layers
    spec = kv_cache_spec(attention_layers(meta_model(hf, tp=tp)), 1, kv_cache_dtype(kv_dtype, torch.bfloat16))
    assert spec.bytes_per_block == per_token


def test_kv_budget_on_gpu_is_what_the_rest_leaves():
    hf = shape_config("llama-3.1-8b")
    plan = plan_memory(plan_config("llama-3.1-8b", max_model_len=8192, max_num_seqs=256), hf, 80 * GiB)
    rest = (plan.weight_bytes + plan.rotary_bytes + plan.activation_bytes + plan.graph_pool_bytes
            + plan.encoder_bytes + plan.runtime_bytes)
    block = plan.kv_bytes_per_token * plan.block_size
    assert plan.kv_blocks == (int(80 * GiB * 0.9) - rest) // block
    assert plan.fits and plan.rank_total_bytes <= plan.budget_bytes
    # with few seats the engine never allocates more than full concurrency can use
    capped = plan_memory(plan_config("llama-3.1-8b", max_model_len=8192, max_num_seqs=2), hf, 80 * GiB)
    assert capped.kv_tokens == 2 * 8192 and capped.kv_budget_tokens > capped.kv_tokens


def test_eager_and_cpu_have_no_graph_pool():
    hf = shape_config("llama-3.1-8b")
    cfg = plan_config("llama-3.1-8b", max_model_len=4096)
    assert plan_memory(cfg, hf, 80 * GiB).graph_pool_bytes > 0
    cfg.compilation.enforce_eager = True
    assert plan_memory(cfg, hf, 80 * GiB).graph_pool_bytes == 0
    cfg.compilation.enforce_eager = False
    assert plan_memory(cfg, hf, None).graph_pool_bytes == 0  # the CPU backend


def test_multimodal_encoder_budget():
    hf = shape_config("qwen2.5-vl-3b")
    cfg = plan_config("qwen2.5-vl-3b", max_model_len=32768)
    cfg.multimodal.limit_mm_per_prompt = {"image": 0, "video": 0}
    off = plan_memory(cfg, hf, 80 * GiB)
    assert off.encoder_bytes == 0 and off.host_cache_bytes == 0
    cfg.multimodal.limit_mm_per_prompt = {"image": 2, "video": 0}
    cfg.multimodal.mm_processor_kwargs = {"max_pixels": 589824}  # 752 tokens an image
    images = plan_memory(cfg, hf, 80 * GiB)
    assert images.encoder_bytes > 0 and images.host_cache_bytes == int(cfg.multimodal.mm_input_cache_gib * GiB)
    cfg.multimodal.limit_mm_per_prompt = {"image": 2, "video": 1}
    assert plan_memory(cfg, hf, 80 * GiB).encoder_bytes > images.encoder_bytes
    assert plan_memory(plan_config("llama-3.1-8b", max_model_len=4096), shape_config("llama-3.1-8b"),
                       80 * GiB).encoder_bytes == 0


# --- verdicts, fixes, auto limits ------------------------------------------------------------
def test_to_dict_and_table():
    plan = plan_memory(plan_config("llama-3.1-8b"), shape_config("llama-3.1-8b"), 80 * GiB)
    d = plan.to_dict()
    assert d["fits"] is True and d["rank_total_bytes"] == plan.rank_total_bytes
    json.dumps(d)
    table = plan.format_table()
    for row in ("weights", "rotary tables", "activations", "CUDA graph pool", "multimodal encoder", "KV cache", "FITS"):
        assert row in table
    assert isinstance(plan, MemoryPlan)


def test_task_plan_exit_codes_and_fixes(tmp_path, capsys):
    from framework.tasks import plan as task
    cfg = plan_config("llama-3.1-8b")
    cfg.task.name, cfg.task.device_memory_gib = "plan", 80
    assert task.run(cfg, tmp_path / "a") == 0
    record = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert record["plan"]["fits"] and record["fixes"] == []
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["plan"]["fits"]

    cfg.task.device_memory_gib = 16
    assert task.run(cfg, tmp_path / "b") == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "saves" in out
    fixes = json.loads((tmp_path / "b" / "plan.json").read_text())["fixes"]
    assert fixes and all(f["fits"] for f in fixes)
    assert any(o.startswith(("quantization=", "parallelism.")) for f in fixes for o in f["overrides"])


def test_fixes_are_valid_hydra_overrides_that_fit():
    """Each suggestion, pasted onto the command line, composes and plans as fitting."""
    from framework.memory.fixes import suggest_fixes
    base = ["model=llama3_8b_dummy", "cache.max_model_len=16384"]
    cfg = compose(base)
    hf = shape_config("llama-3.1-8b")
    fixes = suggest_fixes(cfg, hf, 16 * GiB)
    assert len(fixes) >= 3
    assert [f.saves_bytes for f in fixes] == sorted((f.saves_bytes for f in fixes), reverse=True)
    for fix in fixes:
        fixed = compose(base + fix.overrides)
        assert plan_memory(fixed, hf, 16 * GiB).fits, fix.overrides


@pytest.mark.parametrize("override", ["quantization=int4", "quantization=fp8",
                                      "compilation=eager", "multimodal=text_only", "multimodal=images_only"])
def test_fix_candidates_match_their_yaml(override):
    """A group choice suggested as a fix does to the config what its YAML does."""
    from framework.memory.fixes import _candidates
    cfg = compose(["model=qwen2_5_vl_3b_shape", "cache.max_model_len=8192"])
    hf = shape_config("qwen2.5-vl-3b")
    plan = plan_memory(cfg, hf, 16 * GiB)
    (candidate,) = [c for c in _candidates(cfg, hf, plan) if c.overrides == override.split()]
    applied = copy.deepcopy(cfg)
    candidate.apply(applied)
    assert applied == compose(["model=qwen2_5_vl_3b_shape", "cache.max_model_len=8192", *override.split()])


def test_auto_limits_are_the_largest_that_fit():
    hf = shape_config("llama-3.1-8b")
    cfg = plan_config("llama-3.1-8b", max_model_len="auto", max_num_seqs=8)
    length, seqs = resolve_auto_limits(cfg, hf, 24 * GiB)
    assert seqs == 8 and 0 < length < 131072
    at = lambda n, s: plan_memory(plan_config("llama-3.1-8b", max_model_len=n, max_num_seqs=s), hf, 24 * GiB)
    assert at(length, 8).fits and not at(length + 16, 8).fits
    cfg = plan_config("llama-3.1-8b", max_model_len=8192, max_num_seqs="auto")
    _, seqs = resolve_auto_limits(cfg, hf, 24 * GiB)
    assert at(8192, seqs).kv_budget_tokens >= seqs * 8192 > at(8192, seqs + 1).kv_budget_tokens - 8192
    assert plan_memory(cfg, hf, 24 * GiB).notes[0].startswith("cache.max_num_seqs=auto")
    # both at once: the longest context first, then as many of them as fit
    both = plan_memory(plan_config("llama-3.1-8b", max_model_len="auto", max_num_seqs="auto"), hf, 24 * GiB)
    assert both.fits and both.max_num_seqs >= 1


def test_engine_resolves_auto_once_with_the_planner(tiny_model, monkeypatch):
    """`auto` limits are searched once, before the engine is built, and the engine, the plan and
    metrics.json all see the numbers."""
    from framework import LLM
    import framework.memory.planner as planner
    model_dir = tiny_model("llama")
    cfg = FrameworkConfig()
    cfg.model.path, cfg.cache.max_model_len, cfg.cache.max_num_seqs = str(model_dir), "auto", "auto"
    cfg.cache.cpu_kvcache_space_gib = 0.01
    hf = load_hf_config(model_dir)
    length, seqs = resolve_auto_limits(cfg, hf, None)
    searches = []
    original = planner.resolve_auto_limits
    monkeypatch.setattr(planner, "resolve_auto_limits", lambda *a: searches.append(1) or original(*a))
    with LLM(cfg) as llm:
        assert (llm.config.cache.max_model_len, llm.config.cache.max_num_seqs) == (length, seqs)
        engine = llm.launcher.local_engine()
        assert (engine.max_model_len, engine.runner.max_num_seqs) == (length, seqs)
        assert llm.stats()["resolved_config"]["cache"]["max_num_seqs"] == seqs
        assert llm.plan.max_model_len == length
    assert len(searches) == 1
    assert cfg.cache.max_num_seqs == "auto"  # the caller's config is left as given


# --- planned vs measured on the CPU backend ------------------------------------------------
MEASURE = textwrap.dedent("""
    import json, os, sys
    import torch
    import framework.engine.build  # the engine and its kernels: imported before the baseline
    from transformers import LlamaConfig
    from framework import FrameworkConfig, SamplingParams
    from framework.llm import LLM
    from framework.memory.measure import peak_rss_bytes
    from framework.memory.planner import plan_memory
    torch.set_num_threads(2)
    LlamaConfig()
    baseline = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident now
    cfg = FrameworkConfig()
    cfg.model.path, cfg.model.load_format = sys.argv[1], "dummy"
    cfg.cache.max_model_len, cfg.cache.max_num_seqs, cfg.cache.max_num_batched_tokens = 1024, 2, 512
    with LLM(cfg) as llm:  # two prompts near max_model_len: prefill chunks at full context, then decode
        prompts = [{"prompt_token_ids": [(7 * i + j) % 1000 + 3 for j in range(1000)]} for i in range(2)]
        llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        stats = llm.stats()["ranks"][0]
        plan = plan_memory(cfg, llm.hf_config, None)
    print(json.dumps({"baseline": baseline, "stats": stats, "plan": plan.to_dict()}))
""")


def test_planned_matches_measured_on_cpu(tmp_path):
    """Weight and KV bytes exactly; the peak RSS above the resident baseline (the interpreter with
    torch, transformers and the engine imported) within 15% (+32 MiB) of weights + rotary tables +
    KV cache + activation peak. Measured here: ~5% above, from Python objects, malloc's
    fragmentation and the staging buffers the count leaves out. A subprocess, because ru_maxrss
    is a high-water mark of the whole process and other tests raise it."""
    from transformers import LlamaConfig
    # a large vocabulary makes the weights big and cheap to run (the lm_head scores few rows)
    LlamaConfig(vocab_size=65536, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stats, plan = result["stats"], result["plan"]
    assert stats["weight_bytes"] == plan["weight_bytes"]
    assert stats["kv_bytes"] == plan["kv_cache_bytes"] and stats["kv_tokens"] == plan["kv_tokens"]
    predicted = plan["weight_bytes"] + plan["rotary_bytes"] + plan["kv_cache_bytes"] + plan["activation_bytes"]
    measured = stats["peak_rss_bytes"] - result["baseline"]
    assert abs(measured - predicted) <= 0.15 * predicted + 32 * (1 << 20), (measured, predicted)


# --- planned vs measured on a GPU ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("quant,kv_dtype", [("none", "auto"), ("fp8", "auto"), ("int4", "auto"), ("none", "fp8")])
def test_planned_matches_engine_on_gpu(quant, kv_dtype):
    """The engine's own measured KV budget terms (ModelRunner._gpu_kv_budget) against the plan, on
    Llama-3.1-8B's shape with dummy weights. On an H100: weights exact, activations within 1%,
    KV tokens within 0.2%."""
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 40 * GiB:
        pytest.skip("needs a GPU of 40 GiB or more")
    from framework.llm import LLM
    cfg = plan_config("llama-3.1-8b", max_model_len=8192, max_num_seqs=64)
    cfg.quantization.method = quant
    cfg.cache.kv_cache_dtype = kv_dtype
    with LLM(cfg) as llm:
        plan = plan_memory(cfg, llm.hf_config, total)
        stats = llm.stats()["ranks"][0]
        measured = getattr(llm.launcher.engine.runner, "gpu_memory", {})
    assert stats["weight_bytes"] == plan.weight_bytes
    assert abs(stats["kv_tokens"] - plan.kv_tokens) <= 0.01 * plan.kv_tokens
    if "activation_peak_bytes" in measured:
        # cuBLAS takes its workspace at a process's first matmul: an earlier test's, here, so the
        # engine counts it with the weights, not in its activation peak (the budget is the same)
        error = abs(measured["activation_peak_bytes"] - plan.activation_bytes)
        assert error <= 0.1 * plan.activation_bytes + CUBLAS_WORKSPACE_BYTES


def test_fixes_skip_tp_sizes_the_heads_do_not_allow(tiny_model):
    """A structural fix (tp=8 on a 4-head model) is dropped, never planned (the model would not build)."""
    from framework.memory.fixes import suggest_fixes
    model_dir = tiny_model("llama")
    cfg = FrameworkConfig()
    cfg.model.path = str(model_dir)
    cfg.cache.gpu_memory_utilization = 0.0005
    hf = load_hf_config(model_dir)
    base = plan_memory(cfg, hf, 2 * GiB)
    assert not base.fits
    fixes = suggest_fixes(cfg, hf, 2 * GiB, base)
    assert all("tensor_parallel_size=8" not in " ".join(f.overrides) for f in fixes)


def test_batched_tokens_default_by_device(tiny_model):
    """cache.max_num_batched_tokens=null: 8192 on GPUs of 70 GiB or more (H100, H200), else 2048;
    the plan's activation term follows the resolved value."""
    from framework.config.validate import read_model_config
    from framework.memory.planner import plan_memory
    from framework.resolve import resolve_config
    cfg = FrameworkConfig()
    cfg.model.path = str(tiny_model("llama"))
    hf = read_model_config(cfg, tiny_model("llama"))
    assert cfg.cache.max_num_batched_tokens is None
    assert resolve_config(cfg, hf, None).cache.max_num_batched_tokens == 2048
    assert resolve_config(cfg, hf, 48 * GiB).cache.max_num_batched_tokens == 2048
    assert resolve_config(cfg, hf, 141 * GiB).cache.max_num_batched_tokens == 8192
    cfg.cache.max_num_batched_tokens = 1024
    assert resolve_config(cfg, hf, 141 * GiB).cache.max_num_batched_tokens == 1024
    cfg.cache.max_num_batched_tokens = None
    big, small = plan_memory(cfg, hf, 141 * GiB), plan_memory(cfg, hf, 48 * GiB)
    assert (big.max_num_batched_tokens, small.max_num_batched_tokens) == (8192, 2048)
    assert big.activation_bytes > small.activation_bytes


# --- cache.kv_cache_memory_gib: an exact KV size instead of a share -----------------------------
def test_kv_cache_memory_sets_the_pool_on_gpu_and_must_fit_the_device():
    hf = shape_config("llama-3.1-8b")
    plan = plan_memory(plan_config("llama-3.1-8b", max_model_len=8192, kv_cache_memory_gib=20), hf, 80 * GiB)
    block = plan.kv_bytes_per_token * plan.block_size
    assert plan.kv_blocks == 20 * GiB // block and plan.fits
    assert plan.budget_bytes == 80 * GiB  # the whole device: gpu_memory_utilization does not apply
    assert plan.headroom_bytes == 80 * GiB - plan.rank_total_bytes
    # more than the device holds beside the weights: refused, with the size that fits as a fix
    cfg = plan_config("llama-3.1-8b", max_model_len=8192, kv_cache_memory_gib=75)
    big = plan_memory(cfg, hf, 80 * GiB)
    assert not big.fits and "short of holding its 75.00 GiB KV cache" in big.verdict
    from framework.memory.fixes import suggest_fixes
    room = (80 * GiB - (big.rank_total_bytes - big.kv_cache_bytes)) / GiB
    sizes = [o for f in suggest_fixes(cfg, hf, 80 * GiB, big) for o in f.overrides if "kv_cache_memory" in o]
    assert sizes == [f"cache.kv_cache_memory_gib={int(room * 100) / 100:g}"]
    # less than one request: the verdict says by how much
    small = plan_memory(plan_config("llama-3.1-8b", max_model_len=8192, kv_cache_memory_gib=0.5), hf, 80 * GiB)
    assert not small.fits and small.verdict.startswith("DOES NOT FIT: 0.50 GiB/GPU short of holding one 8192")


def test_kv_cache_memory_sizes_the_cpu_cache_as_planned(tiny_model):
    from framework.config.validate import inert_knobs
    from helpers import greedy, small_config
    cfg = small_config(tiny_model("llama"), max_model_len=64, kv_cache_memory_gib=0.002)
    cfg.cache.cpu_kvcache_space_gib = 1.0  # set too: kv_cache_memory_gib decides, and a note says so
    plan = plan_memory(cfg, load_hf_config(tiny_model("llama")), None)
    _, (stats,) = greedy(cfg, [[1, 2, 3]], 2)
    assert stats["kv_tokens"] == plan.kv_tokens and stats["kv_bytes"] == plan.kv_cache_bytes
    assert stats["kv_bytes"] <= 0.002 * GiB < stats["kv_bytes"] + plan.kv_bytes_per_token * plan.block_size
    notes = [text for _, text in inert_knobs(cfg, load_hf_config(tiny_model("llama")), on_gpu=False, multimodal=False)]
    assert any(n.startswith("cache.cpu_kvcache_space_gib=1.0 (VLLM_CPU_KVCACHE_SPACE): not used on the CPU "
                            "backend; the KV cache's size is cache.kv_cache_memory_gib=0.002") for n in notes)


@pytest.mark.gpu
def test_kv_cache_memory_sizes_the_gpu_cache(tiny_model):
    from framework.config import ConfigError
    from framework.llm import LLM
    from helpers import small_config
    # 2 MiB: under the max_num_seqs x max_model_len cap (256 x 64 tokens, 4 MiB in bf16)
    cfg = small_config(tiny_model("llama"), max_model_len=64, kv_cache_memory_gib=0.002)
    cfg.model.device = "cuda"
    with LLM(cfg) as llm:
        stats = llm.stats()["ranks"][0]
    per_block = stats["kv_bytes"] // stats["kv_blocks"]
    assert stats["kv_tokens"] < 256 * 64 and stats["kv_blocks"] == int(0.002 * GiB) // per_block
    cfg.cache.kv_cache_memory_gib = 10_000.0
    with pytest.raises(ConfigError, match=r"^cache.kv_cache_memory_gib=10000.0: this GPU has .* GiB left"):
        LLM(cfg)


def test_tinygemm_and_compile_workers_where_they_cannot_act_are_said(tiny_model):
    from framework.config.validate import inert_knobs
    from helpers import small_config
    cfg, hf = small_config(tiny_model("llama")), load_hf_config(tiny_model("llama"))
    cfg.quantization.int4_tinygemm = True
    notes = lambda on_gpu: [n for _, n in inert_knobs(cfg, hf, on_gpu=on_gpu, multimodal=False) if "tinygemm" in n]
    assert notes(False) == ["quantization.int4_tinygemm=true: not used on the CPU backend (int4 on CUDA in bf16 only)"]
    assert notes(True) == ["quantization.int4_tinygemm=true: not used with quantization.method=none "
                           "(int4 on CUDA in bf16 only)"]
    cfg.quantization.method, cfg.quantization.group_size = "int4", 128
    assert notes(True) == ["quantization.int4_tinygemm=true: decode steps of 2-4 tokens take tinygemm, slower than "
                           "the default int4 path at group_size=128 (kernels/int4_mma_gemv.py; tinygemm pays off for "
                           "group sizes 32 and 64); its copy costs another 1/2 byte a weight"]
    cfg.quantization.group_size = 64
    assert notes(True) == []
    # auto: as the method resolves for the checkpoint; one stored in int4 keeps no tinygemm copy
    cfg.quantization.method = "auto"
    assert notes(True) == ["quantization.int4_tinygemm=true: not used with quantization.method=auto (resolved to "
                           "none for this checkpoint) (int4 on CUDA in bf16 only)"]
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    hf.quantization_config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    assert notes(True) == ["quantization.int4_tinygemm=true: not used: the checkpoint is stored in int4 and loads "
                           "as stored, with no tinygemm copy"]
    del hf.quantization_config
    cfg.quantization.method = "int4"
    cfg.compilation.compile_workers = 4
    assert [n for _, n in inert_knobs(cfg, hf, on_gpu=False, multimodal=False) if "compile_workers" in n] == [
        "compilation.compile_workers=4: not used on the CPU backend (its kernels are not compiled by Triton)"]
    pdl = lambda on_gpu: [n for _, n in inert_knobs(cfg, hf, on_gpu=on_gpu, multimodal=False) if "dependent" in n]
    assert pdl(False) == []  # the default (on) is said nowhere
    cfg.compilation.programmatic_dependent_launch = False
    assert pdl(False) == ["compilation.programmatic_dependent_launch=false: nothing to switch off on the CPU "
                          "backend (GPU kernels only)"]
    assert pdl(True) == []


def test_custom_all_reduce_off_where_there_is_nothing_to_switch_off_is_said(tiny_model):
    from framework.config.validate import inert_knobs
    from helpers import small_config
    cfg, hf = small_config(tiny_model("llama")), load_hf_config(tiny_model("llama"))
    notes = lambda on_gpu: [n for _, n in inert_knobs(cfg, hf, on_gpu=on_gpu, multimodal=False) if "all_reduce" in n]
    assert notes(True) == []  # the default says nothing
    cfg.parallelism.custom_all_reduce = False
    assert notes(False) == ["parallelism.custom_all_reduce=false: nothing to switch off on the CPU backend "
                            "(it picks the all-reduce of GPU ranks)"]
    assert notes(True) == ["parallelism.custom_all_reduce=false: nothing to switch off at tensor_parallel_size=1 "
                           "(it picks the all-reduce of GPU ranks)"]
    cfg.parallelism.tensor_parallel_size = 2
    assert notes(True) == []


def test_int4_weight_copy_counted_only_where_the_dispatch_makes_one(monkeypatch):
    """On GPU, int4 matmuls of SMALL_M < rows < DEQUANT_ROWS read the codes (w4a16_matmul, for group
    sizes it has a tile for); from DEQUANT_ROWS they unpack the weight for cuBLAS, a model-dtype copy
    the planner counts; group sizes no kernel takes run the torch reference at any size."""
    from framework.layers.quantization.int4 import DEQUANT_ROWS
    from framework.memory import activation
    from framework.memory.shape import DecoderShape

    monkeypatch.setattr(activation, "fused_quant_rows", lambda: 64)  # the GPU backend's, also without Triton here
    shape = DecoderShape(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=64, max_positions=4096, tie_word_embeddings=False,
                         qkv_bias=False, o_bias=False, mlp_bias=False, logits_scaling=1.0, embedding_multiplier=1.0)
    weights = {name: out * inp for name, out, inp in activation.decoder_linears(shape, 1)}

    def per_weight(rows, group=128, reference=False):
        copies = activation.dequantized_bytes(shape, 1, 2, "int4", reference, rows, group)
        assert set(copies) == set(weights)
        per = {copies[name] / n for name, n in weights.items()}
        assert len(per) == 1
        return per.pop()

    assert per_weight(64) == 0 and per_weight(DEQUANT_ROWS - 1) == 0  # the GEMVs / quant_matmul, w4a16_matmul
    assert per_weight(DEQUANT_ROWS) == 2  # unpacked to bf16 for cuBLAS
    assert per_weight(65, group=64) == 0 and per_weight(65, group=32) == 2  # w4a16 has no tile for 32
    assert per_weight(1, group=8) == 6 and per_weight(1, reference=True) == 6  # the torch reference's copies
