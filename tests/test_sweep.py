"""The multirun summary: sweep.csv, sweep.md and pareto.png from each job's metrics.json,
failed and crashed jobs included as rows."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from framework.memory.sweep import SweepSummary, pareto_front, read_job, write_summary

GiB = 1 << 30


def job(root: Path, name: str, overrides, metrics=None) -> Path:
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps({"overrides": overrides, **metrics}))
    return folder


def fake_sweep(root: Path) -> Path:
    plan = lambda total, kv: {"fits": True, "rank_total_bytes": total, "kv_tokens": kv}  # noqa: E731
    rank = lambda peak, kv: {"peak_allocated_bytes": peak, "kv_tokens": kv}  # noqa: E731
    job(root, "0", ["task=bench", "cache.max_num_seqs=8"], {
        "status": "ok", "error": None, "plan": plan(20 * GiB, 1000), "measured": {"ranks": [rank(18 * GiB, 992)]},
        "throughput": {"output_tokens_per_s": 950.5}})
    job(root, "1", ["task=bench", "cache.max_num_seqs=64"], {
        "status": "ok", "error": None, "plan": plan(30 * GiB, 8000), "measured": {"ranks": [rank(29 * GiB, 7984)]},
        "throughput": {"output_tokens_per_s": 2400.0}})
    job(root, "2", ["task=bench", "cache.max_num_seqs=512"], {
        "status": "failed", "error": "RuntimeError: CUDA out of memory", "plan": plan(90 * GiB, 0)})
    job(root, "3", ["task=bench", "cache.max_num_seqs=1024"])  # died before writing metrics.json
    return root


def test_summary_files_and_failed_rows(tmp_path):
    root = fake_sweep(tmp_path / "sweep")
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    for name in ("sweep.csv", "sweep.md", "pareto.png"):
        assert (root / name).is_file() and (root / name).stat().st_size > 0, name
    assert (root / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[1]["output_tokens_per_s"] == "2400.0" and rows[1]["measured_peak_gib"] == "29.0"
    assert rows[1]["planned_peak_gib"] == "30.0" and rows[1]["measured_kv_tokens"] == "7984"
    assert rows[2]["status"] == "failed" and "out of memory" in rows[2]["error"]
    assert rows[3]["status"] == "failed" and "no metrics.json" in rows[3]["error"]
    assert rows[3]["overrides"] == "task=bench cache.max_num_seqs=1024"
    md = (root / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| job | overrides | status") and len(md) == 2 + 4
    assert "| failed |" in md[4] and "CUDA out of memory" in md[4]


def test_plan_only_sweep_and_cpu_ranks(tmp_path):
    """task=plan jobs carry no throughput (the plot shows KV tokens); CPU ranks report RSS."""
    root = tmp_path / "sweep"
    job(root, "0", ["task=plan", "quantization=none"], {"status": "ok", "plan": {"fits": True,
        "rank_total_bytes": 21 * GiB, "kv_tokens": 30000}})
    job(root, "1", ["task=plan", "quantization=int4"], {"status": "failed", "error": "exit code 3", "plan": {
        "fits": False, "rank_total_bytes": 16 * GiB, "kv_tokens": 0}})
    cpu_rank = {"peak_rss_bytes": GiB, "kv_tokens": 64}
    job(root, "2", ["task=generate"], {"status": "ok", "measured": {"ranks": [cpu_rank]},
                                       "throughput": {"output_tokens_per_s": 12.0}})
    out = write_summary(root)
    assert all(p.is_file() for p in out.values())
    row = read_job(root / "2")
    assert row.measured_peak_gib == 1.0 and row.output_tokens_per_s == 12.0 and row.planned_peak_gib is None
    assert read_job(root / "1").fits is False


def test_pareto_front():
    points = [(10, 100), (12, 90), (20, 300), (25, 250), (30, 400)]
    assert pareto_front(points) == [(10, 100), (20, 300), (30, 400)]
