"""The Ray launcher's lifecycle: room checked before any weight, every actor and placement group
released after each run, a dead rank ends the run with one clear error and no leftover process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from framework import FrameworkConfig, SamplingParams, compose
from framework.config import ConfigError
from framework.llm import LLM
from framework.tasks.prompts import sampling_params
pytest.importorskip("ray")  # the GPU image has no Ray; CI and dev machines do
from launchers.ray import RankFailure, RayLauncher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one Ray instance for the module (conftest.py)


def make_config(model_dir, tp: int = 2, max_model_len: int = 128) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path = str(model_dir)
    cfg.parallelism.tensor_parallel_size = tp
    cfg.cache.cpu_kvcache_space_gib = 0.05
    cfg.cache.block_size = 8
    cfg.cache.max_model_len = max_model_len
    cfg.cache.allow_long_max_model_len = True  # long runs of a tiny model, for the kill tests
    cfg.cache.max_num_seqs = 4
    return cfg


def running(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def all_gone(pids, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(running(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def live_placement_groups() -> int:
    from ray.util import placement_group_table
    return sum(pg["state"] != "REMOVED" for pg in placement_group_table().values())


@pytest.fixture
def config_only(tiny_model, tmp_path) -> Path:
    """config.json and no weights: a run that read any weight would fail with another error."""
    shutil.copy(tiny_model("llama") / "config.json", tmp_path / "config.json")
    return tmp_path


def test_more_ranks_than_cpus_fails_before_any_weight(config_only):
    # num_attention_heads=4 allows TP=4; the module's Ray has 2 CPUs, so room for 2 CPU ranks.
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4: needs 4 CPUs .* Ray cluster has 2"):
        LLM(make_config(config_only, tp=4))
    assert live_placement_groups() == 0


def test_a_config_error_after_the_ranks_started_leaves_nothing(config_only):
    """LLM starts the rank actors before it reads config.json (they import meanwhile): a config
    the model refuses still ends in its own error, and the actors and their bundles are gone."""
    import ray
    cpus = ray.available_resources().get("CPU")
    cfg = make_config(config_only, max_model_len=10 ** 6)
    cfg.cache.allow_long_max_model_len = False
    with pytest.raises(ConfigError, match=r"^cache.max_model_len=1000000"):
        LLM(cfg)
    assert live_placement_groups() == 0
    deadline = time.monotonic() + 10  # Ray returns a removed group's resources asynchronously
    while ray.available_resources().get("CPU") != cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == cpus


def test_more_ranks_than_gpus_fails_before_any_weight(config_only):
    # The launcher itself: the driver may have no GPU (a CPU head node), so it asks the cluster.
    from framework.loader.resolve import load_hf_config
    cfg = make_config(config_only, tp=2)
    cfg.model.device = "cuda"
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2: needs 2 GPUs .* Ray cluster has 0"):
        RayLauncher(cfg, config_only, load_hf_config(config_only))
    assert live_placement_groups() == 0


def test_clean_run_releases_actors_and_placement_group(tiny_model):
    with LLM(make_config(tiny_model("llama"))) as llm:
        out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4
        pids = llm.launcher.pids
        assert len(pids) == 2 and live_placement_groups() == 1
    assert all_gone(pids)
    assert live_placement_groups() == 0
    with pytest.raises(RankFailure, match="stopped"):
        llm.generate({"prompt_token_ids": [1]})


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "rank0"])
def test_killed_rank_ends_the_run_with_a_clear_error(tiny_model, victim):
    llm = LLM(make_config(tiny_model("llama"), max_model_len=2048))
    pids = list(llm.launcher.pids)
    # A workload of many seconds; the rank is killed (as the OOM killer would) one second in.
    killer = threading.Timer(1.0, os.kill, (pids[victim], signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(RankFailure, match=rf"rank {victim} of 2 \(pid {pids[victim]}\) died"):
        llm.generate([{"prompt_token_ids": [i + 1, 2, 3]} for i in range(4)],
                     SamplingParams(max_tokens=2000, ignore_eos=True))
    assert time.monotonic() - start < 1.0 + 10.0  # noticed within seconds, not at a timeout
    assert all_gone(pids)
    assert live_placement_groups() == 0
    llm.shutdown()  # harmless after a failure


def test_cli_tp2_matches_tp1_and_leaves_nothing(tmp_path):
    """End to end through Hydra: the launcher starts its own Ray, and stops it."""
    proc = subprocess.run([sys.executable, "-m", "framework.run", "parallelism=tp2", "task.max_tokens=8",
                           "task.progress=false", f"hydra.run.dir={tmp_path}/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "outputs.jsonl").read_text().splitlines()]
    cfg = compose(["task.max_tokens=8"])
    with LLM(cfg) as llm:  # TP=1 in this process
        expected = [o.token_ids for o in llm.generate(cfg.task.prompts, sampling_params(cfg.task))]
    assert [r["token_ids"] for r in rows] == expected
    ranks = json.loads((tmp_path / "run" / "metrics.json").read_text())["measured"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all_gone([r["pid"] for r in ranks])
