"""task=plan: will it fit? A per-rank memory plan from config.json and the knobs; no weight read.

Plans for `task.device_memory_gib` when set, else for the GPU present, else the CPU backend.
Prints the plan, and when it does not fit the overrides that would, each re-planned. Writes
plan.json (and the plan into metrics.json). Exit code 0: fits; 3: does not fit.
"""
from __future__ import annotations

import json
from pathlib import Path

from framework.config.schema import FrameworkConfig
from framework.config.validate import read_model_config, validate_against_model
from framework.loader.resolve import resolve_model_path
from framework.memory.fixes import format_fixes, suggest_fixes
from framework.memory.planner import plan_memory, target_device_memory
from framework.tasks.metrics import write_metrics

FITS, NO_FIT = 0, 3


def run(cfg: FrameworkConfig, run_dir: Path) -> int:
    hf_config = read_model_config(cfg, resolve_model_path(cfg.model.path))  # refuses remote-code configs
    validate_against_model(cfg, hf_config)
    device_memory = target_device_memory(cfg)
    plan = plan_memory(cfg, hf_config, device_memory)
    print(plan.format_table())
    fixes = [] if plan.fits else suggest_fixes(cfg, hf_config, device_memory, plan)
    if not plan.fits:
        print(format_fixes(plan, fixes))
    record = {"plan": plan.to_dict(), "fixes": [f.to_dict() for f in fixes]}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
    write_metrics(run_dir, record)
    return FITS if plan.fits else NO_FIT
