"""metrics.json: what a run predicted and measured, merged from every part of the run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def write_metrics(run_dir: Path, record: Dict[str, Any]) -> Path:
    """Merge `record` into run_dir/metrics.json (tasks add their figures, run.py the outcome)."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(record)
    path.write_text(json.dumps(current, indent=2, default=str) + "\n")
    return path
