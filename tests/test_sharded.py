"""Sharded checkpoints: save each rank's weights at TP=2, reload them at TP=2 with the same tokens,
each rank reading only its own file; any other TP size or quantization is a clear error."""
from __future__ import annotations

import json

import pytest

from framework import FrameworkConfig
from framework.config.errors import UserError
from framework.llm import LLM
from helpers import greedy, small_config
from framework.loader.resolve import load_hf_config
from framework.loader.sharded import Manifest
from framework.memory.planner import plan_memory
from framework.tasks import save_sharded

PROMPTS = [[1, 5, 7, 9, 11], [3] * 21, list(range(10, 47))]
MAX_TOKENS = 8


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray instance for the module (conftest.py)


def make_config(model_dir, tp: int, load_format: str = "auto") -> FrameworkConfig:
    return small_config(model_dir, tp, load_format, max_model_len=128, max_num_seqs=4)


def save(model_dir, out_dir, tp: int, run_dir, quantization: str = "none") -> None:
    cfg = make_config(model_dir, tp)
    cfg.quantization.method = quantization
    cfg.task.name, cfg.task.output_dir = "save_sharded", str(out_dir)
    assert save_sharded.run(cfg, run_dir) == 0


@pytest.fixture(scope="module")
def saved_tp2(tiny_model, tmp_path_factory):
    """(original folder, sharded folder saved at TP=2, TP=1 greedy tokens of the original)."""
    model_dir = tiny_model("qwen2")  # tied embeddings and q/k/v biases: the awkward cases
    out = tmp_path_factory.mktemp("sharded") / "tp2"
    save(model_dir, out, 2, tmp_path_factory.mktemp("run"))
    return model_dir, out, greedy(make_config(model_dir, 1), PROMPTS, MAX_TOKENS)[0]


def test_save_writes_a_loadable_model_folder(saved_tp2):
    model_dir, out, _ = saved_tp2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensor_parallel_size"] == 2 and manifest["quantization"] == "none"
    assert manifest["dtype"] == "float32" and manifest["architectures"] == ["Qwen2ForCausalLM"]
    assert manifest["files"] == ["rank0.safetensors", "rank1.safetensors"]
    assert (out / "config.json").read_text() == (model_dir / "config.json").read_text()
    assert (out / "generation_config.json").is_file()
    assert not (out / "model.safetensors").exists()


def test_reload_sharded_tp2_same_tokens_own_file_only(saved_tp2):
    _, out, expected = saved_tp2
    ours, ranks = greedy(make_config(out, 2, "sharded"), PROMPTS, MAX_TOKENS)
    assert ours == expected
    for r in ranks:  # each rank read all of its own file's tensors, and nothing else
        from safetensors import safe_open
        with safe_open(str(out / f"rank{r['rank']}.safetensors"), "pt") as f:
            own = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
        assert r["bytes_read"] == own == r["weight_bytes"]


def test_reload_at_another_tp_size_is_a_clear_error(saved_tp2):
    _, out, _ = saved_tp2
    with pytest.raises(UserError, match=r"tensor_parallel_size=1.*saved with tensor_parallel_size=2"):
        LLM(make_config(out, 1, "sharded"))


def test_other_quantization_is_a_clear_error(saved_tp2):
    _, out, _ = saved_tp2
    manifest = Manifest.read(out)
    with pytest.raises(UserError, match=r"quantization.method=int8.*saved with quantization.method=none"):
        manifest.check(out, 2, "int8")
    manifest.check(out, 2, "none")  # what quantization.method=auto resolves to here (config.json's none)


def test_save_and_reload_tp1(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    save(model_dir, tmp_path / "tp1", 1, tmp_path / "run")
    expected, (plain,) = greedy(make_config(model_dir, 1), PROMPTS, MAX_TOKENS)
    ours, (sharded,) = greedy(make_config(tmp_path / "tp1", 1, "sharded"), PROMPTS, MAX_TOKENS)
    assert ours == expected and sharded["bytes_read"] == plain["bytes_read"]


def test_quantized_at_load_reloads_with_auto(tiny_model, tmp_path):
    """int8 weights saved as held: auto reads the method from the manifest, not config.json."""
    model_dir = tiny_model("llama")
    save(model_dir, tmp_path / "int8", 1, tmp_path / "run", quantization="int8")
    direct = make_config(model_dir, 1)
    direct.quantization.method = "int8"
    expected, (quantized,) = greedy(direct, PROMPTS, MAX_TOKENS)
    reloaded = make_config(tmp_path / "int8", 1, "sharded")
    reloaded.quantization.method = "auto"
    ours, (sharded,) = greedy(reloaded, PROMPTS, MAX_TOKENS)
    assert ours == expected and sharded["weight_bytes"] == quantized["weight_bytes"]
    # the planner plans what is held (int8 codes and scales), not config.json's full precision
    plan = plan_memory(reloaded, load_hf_config(tmp_path / "int8"), None)
    assert plan.quantization == "int8" and plan.weight_bytes == sharded["weight_bytes"]


def test_save_refuses_a_non_empty_folder(tiny_model, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        save(tiny_model("llama"), tmp_path / "out", 1, tmp_path / "run")


def test_missing_manifest_is_a_clear_error(tiny_model):
    with pytest.raises(UserError, match="manifest.json does not exist.*task=save_sharded"):
        LLM(make_config(tiny_model("llama"), 1, "sharded"))
