"""After a multirun: one table of every job (sweep.csv, sweep.md) and a Pareto plot of peak
memory against throughput (pareto.png), written into the sweep folder.

Each job folder holds the metrics.json that framework/run.py writes (overrides, status, error,
plan, measured, throughput). A job that crashed before writing one is still a row, failed,
with its overrides read from Hydra's .hydra/overrides.yaml. Registered in conf/config.yaml
under hydra.callbacks; Hydra imports this module for every run, so it imports only Hydra's
Callback at the top and matplotlib only when it draws.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
GiB = 1 << 30


@dataclass
class JobRow:
    job: str
    overrides: str
    status: str  # ok | failed
    error: str
    fits: Optional[bool]
    planned_peak_gib: Optional[float]  # the plan's per-rank total
    measured_peak_gib: Optional[float]  # the largest rank's peak (GPU allocated, or CPU RSS)
    planned_kv_tokens: Optional[int]
    measured_kv_tokens: Optional[int]
    output_tokens_per_s: Optional[float]

    @property
    def peak_gib(self) -> Optional[float]:
        return self.measured_peak_gib if self.measured_peak_gib is not None else self.planned_peak_gib


def _gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GiB, 3)


def _ranks(measured: Any) -> List[Dict[str, Any]]:
    """`measured` is LLM.stats() ({"ranks": [...]}) or already a list of rank_stats dicts."""
    if isinstance(measured, dict):
        measured = measured.get("ranks", [measured])
    return [r for r in measured or [] if isinstance(r, dict)]


def _overrides_yaml(job_dir: Path) -> List[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def read_job(job_dir: Path) -> JobRow:
    path = job_dir / "metrics.json"
    m: Dict[str, Any] = {}
    if path.is_file():
        try:
            m = json.loads(path.read_text())
        except ValueError as exc:
            m = {"status": "failed", "error": f"unreadable metrics.json: {exc}"}
    else:
        m = {"status": "failed", "error": "no metrics.json: the job died before writing it"}
    plan = m.get("plan") or {}
    ranks = _ranks(m.get("measured"))
    peaks = [r.get("peak_allocated_bytes", r.get("peak_rss_bytes")) for r in ranks]
    peaks = [p for p in peaks if p is not None]
    throughput = m.get("throughput")
    tok_s = throughput.get("output_tokens_per_s") if isinstance(throughput, dict) else throughput
    return JobRow(
        job=job_dir.name,
        overrides=" ".join(m.get("overrides") or _overrides_yaml(job_dir)),
        status=m.get("status") or "ok",
        error=str(m.get("error") or ""),
        fits=plan.get("fits"),
        planned_peak_gib=_gib(plan.get("rank_total_bytes")),
        measured_peak_gib=_gib(max(peaks) if peaks else None),
        planned_kv_tokens=plan.get("kv_tokens"),
        measured_kv_tokens=ranks[0].get("kv_tokens") if ranks else None,
        output_tokens_per_s=tok_s)


def job_dirs(sweep_dir: Path) -> List[Path]:
    """Hydra's job folders (0, 1, ...): any child holding metrics.json or .hydra/."""
    found = [d for d in sweep_dir.iterdir()
             if d.is_dir() and ((d / "metrics.json").is_file() or (d / ".hydra").is_dir())]
    return sorted(found, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def varying_overrides(rows: List[JobRow]) -> Dict[str, str]:
    """job -> the overrides that differ between jobs (what a plot label needs)."""
    sets = [r.overrides.split() for r in rows]
    common = set.intersection(*map(set, sets)) if sets else set()
    return {r.job: " ".join(o for o in s if o not in common) or f"job {r.job}" for r, s in zip(rows, sets)}


def override_pairs(overrides: str) -> Dict[str, str]:
    """'task=bench +recipe=low_mem cache.max_num_seqs=8' -> {task: bench, recipe: low_mem, cache.max_num_seqs: 8}."""
    pairs = (o.partition("=") for o in overrides.split())
    return {key.lstrip("+~"): value for key, sep, value in pairs if sep}


def swept_keys(rows: List[JobRow]) -> List[str]:
    """Keys whose value differs between jobs, in first-seen order (every key if none differs)."""
    per_job = [override_pairs(r.overrides) for r in rows]
    keys = list(dict.fromkeys(k for pairs in per_job for k in pairs))
    swept = [k for k in keys if len({pairs.get(k) for pairs in per_job}) > 1]
    return swept or keys


def write_csv(rows: List[JobRow], path: Path) -> None:
    """One column per swept key (its value in each job), then the figures, then all overrides."""
    keys = swept_keys(rows)
    names = [fl.name for fl in fields(JobRow) if fl.name != "overrides"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", *keys, *names[1:], "overrides"])
        writer.writeheader()
        for r in rows:
            pairs = override_pairs(r.overrides)
            record = {k: "" if v is None else v for k, v in asdict(r).items()}
            writer.writerow({**record, **{k: pairs.get(k, "") for k in keys}})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown(rows: List[JobRow], path: Path) -> None:
    head = ["job", "overrides", "status", "fits", "planned peak GiB", "measured peak GiB",
            "planned KV tokens", "measured KV tokens", "output tok/s", "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.job, f"`{r.overrides}`" if r.overrides else "", r.status, r.fits, r.planned_peak_gib,
                 r.measured_peak_gib, r.planned_kv_tokens, r.measured_kv_tokens, r.output_tokens_per_s, r.error]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def pareto_front(points: List[tuple]) -> List[tuple]:
    """(memory, throughput, ...) points no other point beats on both (less memory, more tok/s)."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def plot_pareto(rows: List[JobRow], path: Path) -> None:
    """Peak memory (measured, else planned) against output tok/s, one labelled point per job, the
    Pareto front (least memory for the throughput) as a line, and a legend. A sweep of task=plan
    measures no throughput: it plots the planned KV tokens instead. Jobs with no memory figure
    (refused before a plan) are listed under the plot with their error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_throughput = any(r.output_tokens_per_s is not None for r in rows)
    value = (lambda r: r.output_tokens_per_s) if by_throughput else (lambda r: r.planned_kv_tokens)
    labels = varying_overrides(rows)
    shown = [(r, r.peak_gib, value(r) or 0) for r in rows if r.peak_gib is not None]
    unplotted = [r for r in rows if r.peak_gib is None]
    span_x = max([x for _, x, _ in shown], default=1) or 1
    span_y = max([y for _, _, y in shown], default=1) or 1
    placed: Dict[tuple, list] = {}  # jobs within 1% of each other share one label
    points = []
    styles = {"ok": ("o", "tab:blue", "job (ok)"), "failed": ("x", "tab:red", "job (failed)"),
              "empty": ("x", "tab:gray", "job (ok, no figure)")}
    used = set()
    fig, ax = plt.subplots(figsize=(9, 6))
    for r, x, y in shown:
        kind = "failed" if r.status != "ok" else ("ok" if value(r) is not None else "empty")
        marker, color, name = styles[kind]
        ax.scatter([x], [y], marker=marker, color=color, label=None if kind in used else name)
        used.add(kind)
        spot = placed.setdefault((round(100 * x / span_x), round(100 * y / span_y)), [x, y, []])
        spot[2].append(labels[r.job] + ("" if r.status == "ok" else " (failed)"))
        if kind == "ok":
            points.append((x, y))
    for x, y, names in placed.values():
        ax.annotate("\n".join(names), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    front = pareto_front(points)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--o", color="tab:green", alpha=0.6,
                fillstyle="none", markersize=11, label="Pareto front (no job has less memory and more "
                + ("tok/s" if by_throughput else "KV") + ")")
    if unplotted:
        ax.scatter([], [], marker="x", color="tab:red", label="not plotted: no memory figure (below)")
        notes = [f"job {r.job} [{labels[r.job]}]: {r.status}{': ' + r.error[:90] if r.error else ''}"
                 for r in unplotted]
        fig.text(0.01, -0.02, "Not plotted (no memory figure):\n" + "\n".join(notes), fontsize=7, va="top",
                 color="tab:red")
    if used or front or unplotted:
        ax.legend(loc="best", fontsize=8)
    measured = any(r.measured_peak_gib is not None for r in rows)
    ax.set_xlabel(f"peak memory per rank, GiB ({'measured' if measured else 'planned'})")
    ax.set_ylabel("output tokens/s" if by_throughput else "KV cache tokens (planned; no throughput measured)")
    ax.set_title("Sweep: memory vs " + ("throughput" if by_throughput else "KV capacity"))
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_summary(sweep_dir: Path) -> Dict[str, Path]:
    """Gather every job of `sweep_dir`; write sweep.csv, sweep.md and pareto.png beside them."""
    sweep_dir = Path(sweep_dir)
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    out = {"csv": sweep_dir / "sweep.csv", "md": sweep_dir / "sweep.md", "png": sweep_dir / "pareto.png"}
    write_csv(rows, out["csv"])
    write_markdown(rows, out["md"])
    plot_pareto(rows, out["png"])
    return out


class SweepSummary(Callback):
    """hydra.callbacks entry: summarize the sweep once every job has returned."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            out = write_summary(sweep_dir)
        except Exception as exc:  # a summary must never turn a finished sweep into a failure
            log.warning("sweep summary failed: %s: %s", type(exc).__name__, exc)
            return
        log.info("sweep summary: %s, %s, %s", out["csv"], out["md"], out["png"])
        print((sweep_dir / "sweep.md").read_text())
