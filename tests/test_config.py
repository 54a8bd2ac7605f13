"""The front door: every YAML composes, every bad value is one clear line naming its key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from framework import compose
from framework.config import ConfigError, FrameworkConfig, validate_against_model
from framework.config.schema import CompilationLevel

REPO = Path(__file__).resolve().parents[1]
GROUP_CHOICES = sorted((p.parent.name, p.stem) for p in (REPO / "conf").glob("*/*.yaml")
                       if p.parent.name != "recipe")
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_defaults_compose_to_dataclasses():
    cfg = compose()
    assert isinstance(cfg, FrameworkConfig)
    assert cfg.model.path == "pydoc-llama" and cfg.task.name == "generate"
    assert cfg.parallelism.tensor_parallel_size == 1


@pytest.mark.parametrize("group,choice", GROUP_CHOICES)
def test_every_group_choice_composes(group, choice):
    compose([f"{group}={choice}"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    compose([f"+recipe={recipe}"])


def test_required_recipes_exist():
    assert {"low_mem", "high_throughput", "tp2", "text_only_vlm"} <= set(RECIPES)


def test_low_mem_recipe_combines_the_seed_advice():
    cfg = compose(["+recipe=low_mem"])
    assert cfg.quantization.method == "int4" and cfg.cache.kv_cache_dtype == "fp8"
    assert cfg.compilation.enforce_eager and cfg.cache.max_num_seqs <= 8 and cfg.cache.max_model_len <= 4096


def test_recipe_overrides_can_be_overridden_again():
    cfg = compose(["+recipe=low_mem", "cache.max_num_seqs=2", "quantization=int8"])
    assert cfg.cache.max_num_seqs == 2 and cfg.quantization.method == "int8"


def test_user_recipe_folder_via_searchpath(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\ncache:\n  max_num_seqs: 3\n")
    cfg = compose([f"hydra.searchpath=[file://{tmp_path}]", "+recipe=mine"])
    assert cfg.cache.max_num_seqs == 3


def test_compilation_level_by_name_or_number():
    assert compose(["compilation.level=PIECEWISE"]).compilation.level == CompilationLevel.PIECEWISE
    assert compose(["compilation.level=3"]).compilation.level == 3
    piecewise = compose(["compilation=piecewise"]).compilation
    assert piecewise.level == 3 and piecewise.cudagraph_capture_sizes == [1, 2, 4, 8, 16]


def test_env_var_defaults(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.setenv("VLLM_MM_INPUT_CACHE_GIB", "0.5")
    cfg = compose()
    assert cfg.cache.cpu_kvcache_space_gib == 7.0 and cfg.multimodal.mm_input_cache_gib == 0.5
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.delenv("VLLM_MM_INPUT_CACHE_GIB")
    cfg = compose()
    assert cfg.cache.cpu_kvcache_space_gib == 4.0 and cfg.multimodal.mm_input_cache_gib == 4.0


def test_dict_knobs_accept_new_keys_with_plus():
    cfg = compose(["++multimodal.limit_mm_per_prompt={image: 2, video: 0}",
                   "+multimodal.mm_processor_kwargs.max_pixels=589824"])
    assert cfg.multimodal.limit_mm_per_prompt == {"image": 2, "video": 0}
    assert cfg.multimodal.mm_processor_kwargs == {"max_pixels": 589824}


BAD = [
    ("cache.max_num_seq=8", "cache.max_num_seq", "did you mean cache.max_num_seqs"),
    ("+cache.foo=1", "cache.foo", "unknown key"),
    ("cache.max_num_seqs=abc", "cache.max_num_seqs", "positive integer"),
    ("cache.max_num_seqs=0", "cache.max_num_seqs", "positive integer"),
    ("cache.block_size=12", "cache.block_size", "power of two"),
    ("cache.gpu_memory_utilization=1.5", "cache.gpu_memory_utilization", "(0, 1]"),
    ("cache.gpu_memory_utilization=0", "cache.gpu_memory_utilization", "(0, 1]"),
    ("cache.max_model_len=-5", "cache.max_model_len", "positive integer"),
    ("cache.kv_cache_dtype=int2", "cache.kv_cache_dtype", "auto, fp8"),
    ("cache.cpu_kvcache_space_gib=0", "cache.cpu_kvcache_space_gib", "> 0"),
    ("cache.kv_cache_memory_gib=-1", "cache.kv_cache_memory_gib", "> 0 GiB (or null)"),
    ("compilation.cudagraph_capture_sizes=[4,2]", "compilation.cudagraph_capture_sizes", "increasing"),
    ("compilation.cudagraph_capture_sizes=[0,1]", "compilation.cudagraph_capture_sizes", "positive"),
    ("compilation.level=7", "compilation.level", "PIECEWISE"),
    ("quantization=fp9", "quantization", "valid: auto, fp8, int4, int8, none"),
    ("quantization.method=fp9", "quantization.method", "none, fp8, int8, int4, auto"),
    ("+multimodal.limit_mm_per_prompt.imag=2", "multimodal.limit_mm_per_prompt.imag", "image, video, audio"),
    ("+multimodal.limit_mm_per_prompt.image=-1", "multimodal.limit_mm_per_prompt.image", ">= 0"),
    ("parallelism.tensor_parallel_size=0", "parallelism.tensor_parallel_size", "positive integer"),
    ("model.dtype=float64", "model.dtype", "auto, float32, bfloat16, float16"),
    ("launcher=local", "launcher.name", None),  # only with TP>1, checked below
    ("task.top_p=0", "task.top_p", "(0, 1]"),
    ("task.max_tokens=0", "task.max_tokens", "positive integer"),
]


@pytest.mark.parametrize("override,key,expected", [b for b in BAD if b[2]])
def test_bad_values_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as info:
        compose([override])
    message = str(info.value)
    assert info.value.key == key and message.startswith(key)
    assert expected in message and "\n" not in message


def test_local_launcher_refuses_tp():
    with pytest.raises(ConfigError, match="launcher.name"):
        compose(["launcher=local", "parallelism=tp2"])


def test_model_checks_tp_divides_heads_and_context_limit(tiny_model):
    from framework.loader.resolve import load_hf_config
    hf = load_hf_config(tiny_model("llama"))  # 4 heads, 2 KV heads, 256 positions
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3: must divide the model's "
                                          r"num_attention_heads=4; valid: 1, 2, 4"):
        validate_against_model(compose(["parallelism.tensor_parallel_size=3"]), hf)
    validate_against_model(compose(["parallelism.tensor_parallel_size=4"]), hf)  # KV heads replicated
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        validate_against_model(compose(["cache.max_model_len=512"]), hf)
    validate_against_model(compose(["cache.max_model_len=512", "cache.allow_long_max_model_len=true"]), hf)


@pytest.mark.parametrize("override,key", [("cache.max_num_seq=8", "cache.max_num_seq"),
                                          ("cache.gpu_memory_utilization=1.5", "cache.gpu_memory_utilization"),
                                          ("model.path=/nonexistent/model", "model.path")])
def test_cli_prints_one_line_and_exits_2(override, key):
    proc = subprocess.run([sys.executable, "-m", "framework.run", override], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_prints_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "framework.run", "--cfg", "job", "+recipe=low_mem"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "method: int4" in proc.stdout and "kv_cache_dtype: fp8" in proc.stdout
