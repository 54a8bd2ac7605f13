"""What a newcomer trips over following README, each fixed: messages that show the value given
and suggest what works, a GPU asked for where there is none, save_sharded's dtype and file mode,
a mismatched sharded folder refused before anything starts, knobs that do nothing said at start,
bench's latency percentiles, the sweep table and plot, and log noise."""
from __future__ import annotations

import csv
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework import compose
from framework.config import ConfigError, FrameworkConfig, UserError, validate
from framework.config.compose import normalize_overrides
from framework.config.validate import inert_knobs, validate_device_present
from helpers import small_config

REPO = Path(__file__).resolve().parents[1]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


def test_recipe_without_plus_suggests_what_works():
    with pytest.raises(ConfigError) as err:
        compose(["recipe=low_mem"])
    assert str(err.value) == "recipe='low_mem': recipe is an optional config group; select it with +recipe=low_mem"
    assert compose(["+recipe=low_mem"]).cache.max_num_seqs == 4  # the suggestion works


def test_dict_overrides_and_home_paths_just_work():
    assert compose(["multimodal.limit_mm_per_prompt={image: 2}"]).multimodal.limit_mm_per_prompt == {"image": 2}
    assert compose(["multimodal.limit_mm_per_prompt.video=0"]).multimodal.limit_mm_per_prompt == {"video": 0}
    assert compose(["+recipe=low_mem", "multimodal.mm_processor_kwargs={max_pixels: 1024}"]) \
        .multimodal.mm_processor_kwargs == {"max_pixels": 1024}
    assert compose(["model.path=~/models/x"]).model.path == "~/models/x"  # expanded where it is resolved
    untouched = ["-m", "cache.max_num_seqs=1,2", "++x.y=1"]
    assert normalize_overrides(untouched) == untouched


@pytest.mark.parametrize("override, shown", [
    ("multimodal.limit_mm_per_prompt={image: x}", "multimodal.limit_mm_per_prompt.image='x'"),
    ("multimodal.limit_mm_per_prompt={imag: 2}", "multimodal.limit_mm_per_prompt.imag=2"),
    ("model.path=[a", "model.path='[a'"),
    ("cache.max_num_seq=8", "cache.max_num_seq='8'"),
    ("cache.block_size=[1]", "cache.block_size='[1]'"),
    ("model=nope", "model='nope'"),
    ("+recipe=nope", "recipe='nope'"),
    ("model.device=cuda:1", "model.device='cuda:1'"),
])
def test_messages_show_the_value_given(override, shown):
    with pytest.raises(ConfigError) as err:
        compose([override])
    message = str(err.value)
    assert message.startswith(shown) and "=None" not in message and "\n" not in message, message


def test_cuda_index_means_the_first_visible_gpu_or_says_how():
    cfg = FrameworkConfig()
    cfg.model.device = "cuda:0"
    assert validate(cfg).model.device == "cuda"
    cfg.model.device = "cuda:1"
    with pytest.raises(ConfigError, match=r"^model.device='cuda:1': pick the GPU with CUDA_VISIBLE_DEVICES=1"):
        validate(cfg)


@no_gpu
def test_cuda_without_a_gpu_is_one_line():
    cfg = FrameworkConfig()
    cfg.model.device = "cuda"
    with pytest.raises(ConfigError, match=r"^model.device='cuda': this torch build has no CUDA|no GPU is visible"):
        validate_device_present(cfg)
    cfg.launcher.address = "10.0.0.1:6379"  # a CPU-only driver of a GPU cluster is fine
    validate_device_present(cfg)
    cfg.launcher.address, cfg.task.name, cfg.task.device_memory_gib = None, "plan", 24.0
    validate_device_present(cfg)  # planning for a GPU named by its size needs none


@no_gpu
def test_cli_plan_on_cuda_without_gpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "framework.run", "task=plan", "model.device=cuda",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: model.device='cuda': "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def bf16_model(tiny_model, tmp_path) -> Path:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    return tmp_path / "bf16"


def test_save_sharded_keeps_checkpoint_dtype_and_a_shareable_mode(tiny_model, tmp_path):
    from framework.tasks import save_sharded
    source = bf16_model(tiny_model, tmp_path)
    cfg = small_config(source)
    cfg.task.name, cfg.task.output_dir = "save_sharded", str(tmp_path / "out")
    assert save_sharded.run(cfg, tmp_path / "run") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shard = tmp_path / "out" / "rank0.safetensors"
    assert manifest["dtype"] == "bfloat16"
    assert shard.stat().st_size < 1.1 * (source / "model.safetensors").stat().st_size  # not float32's 2x
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(shard.stat().st_mode) == 0o666 & ~umask


def test_mismatched_sharded_folder_refused_before_plan_or_ranks(tiny_model, tmp_path, monkeypatch, caplog):
    import launchers
    from framework.llm import LLM
    from framework.tasks import save_sharded
    cfg = small_config(tiny_model("llama"))
    cfg.task.name, cfg.task.output_dir = "save_sharded", str(tmp_path / "tp1")
    assert save_sharded.run(cfg, tmp_path / "run") == 0
    started = []
    monkeypatch.setattr(launchers, "start_launcher", lambda *a: started.append(a))
    caplog.set_level(logging.INFO)
    with pytest.raises(UserError, match=r"tensor_parallel_size=2, but the sharded checkpoint .* saved with "
                                        r"tensor_parallel_size=1"):
        LLM(small_config(tmp_path / "tp1", tp=2, load_format="sharded"))
    assert not started and "Memory plan" not in caplog.text


def test_knobs_that_do_nothing_are_said_at_start(tiny_model):
    from transformers import AutoConfig
    text_model = AutoConfig.from_pretrained(tiny_model("llama"))
    default = FrameworkConfig()
    assert inert_knobs(default, text_model, on_gpu=True, multimodal=False) == []
    ((level, note),) = inert_knobs(default, text_model, on_gpu=False, multimodal=False)  # default graphs: info
    assert level == logging.INFO and "CUDA graphs" in note and "CPU backend" in note
    chosen = compose(["compilation=piecewise", "multimodal.limit_mm_per_prompt={image: 2}"])
    notes = dict((note.split(":")[0], level)
                 for level, note in inert_knobs(chosen, text_model, on_gpu=False, multimodal=False))
    assert notes == {"compilation.level=PIECEWISE, compilation.cudagraph_capture_sizes=[1, 2, 4, 8, 16]":
                     logging.WARNING, "multimodal.limit_mm_per_prompt={'image'": logging.WARNING}
    assert inert_knobs(chosen, text_model, on_gpu=True, multimodal=True) == []  # a vision model uses them


def test_bench_metrics_has_latency_percentiles(tiny_model, tmp_path):
    from framework.tasks import bench
    cfg = small_config(tiny_model("llama"), max_model_len=128, max_num_seqs=4)
    t = cfg.task
    t.name, t.num_requests, t.input_len_range, t.output_len_range, t.compare_hf = "bench", 6, [4, 8], [2, 6], False
    assert bench.run(cfg, tmp_path) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())["throughput"]
    for key in ("latency_s", "ttft_s"):
        p = result[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], p
    assert result["ttft_s"]["p99"] <= result["latency_s"]["p99"] and result["requests"] == 6


@pytest.mark.parametrize("api", ["generate", pytest.param("generate_batch", marks=pytest.mark.slow)])
def test_bench_times_hf_with_either_api(tiny_model, tmp_path, api):
    """task.compare_hf_api: HF's static batches or its continuous batching run the same requests to
    the longest length asked (an early stop would fail the run) and bench records which one ran."""
    from framework.tasks import bench
    cfg = small_config(tiny_model("llama"), max_model_len=128, max_num_seqs=4)
    t = cfg.task
    t.name, t.num_requests, t.input_len_range, t.output_len_range = "bench", 3, [4, 8], [2, 5]
    t.compare_hf, t.compare_hf_api = True, api
    assert bench.run(cfg, tmp_path) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())["throughput"]
    assert result["hf_api"] == api and result["hf_requests"] == 3 and result["hf_output_tokens_per_s"] > 0


def test_sweep_csv_has_a_column_per_swept_key(tmp_path):
    from framework.memory.sweep import write_summary
    for i, (seqs, quant) in enumerate([(8, "none"), (8, "int8"), (32, "none")]):
        folder = tmp_path / str(i)
        folder.mkdir()
        overrides = ["task=bench", f"cache.max_num_seqs={seqs}", f"quantization={quant}"]
        (folder / "metrics.json").write_text(json.dumps({"overrides": overrides, "status": "ok",
                                                         "throughput": {"output_tokens_per_s": 10.0 * (i + 1)}}))
    write_summary(tmp_path)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert list(rows[0])[:3] == ["job", "cache.max_num_seqs", "quantization"]  # task=bench did not vary
    assert [(r["cache.max_num_seqs"], r["quantization"]) for r in rows] == [("8", "none"), ("8", "int8"),
                                                                           ("32", "none")]


@pytest.mark.slow
def test_redirected_log_has_no_colour_codes_or_ray_auth_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_COLOR_PREFIX")}
    proc = subprocess.run([sys.executable, "-m", "framework.run", "+recipe=tp2", "task.max_tokens=4",
                           "task.progress=false", f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "\x1b[" not in log and "Token authentication" not in log


def test_plan_refuses_a_remote_code_config_in_one_line(tmp_path):
    """task=plan reads config.json as the engine does: a model type only the checkpoint's own code
    defines is one line (transformers would otherwise stop to ask on stdin)."""
    import json
    from framework import compose
    from framework.config.errors import UserError
    from framework.tasks import plan
    (tmp_path / "config.json").write_text(json.dumps({  # InternLM2 alone (InternVL2's own layout is read natively)
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}}))
    with pytest.raises(UserError, match="model_type 'internlm2' is defined only by the checkpoint's own code"):
        plan.run(compose(["task=plan", f"model.path={tmp_path}"]), tmp_path / "run")
