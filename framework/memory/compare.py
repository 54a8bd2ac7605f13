"""The plan beside what the run measured: one row per rank, for the end of every run."""
from __future__ import annotations

from typing import Any, Dict, List

GiB = 1 << 30


def measured_peak(rank: Dict[str, Any]) -> int:
    """GPU: device-level use (allocator + CUDA context); CPU: the process's peak RSS."""
    return rank.get("device_used_bytes") or rank.get("peak_rss_bytes") or 0


def _decoder_weights(rank: Dict[str, Any]):
    """The plan counts a vision tower with the multimodal encoder, not in `weight_bytes`: so here."""
    held = rank.get("weight_bytes")
    return None if held is None else held - rank.get("vision_weight_bytes", 0)


def compare_rows(plan: Dict[str, Any], ranks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for i, rank in enumerate(ranks):
        peak = measured_peak(rank)
        predicted = plan["rank_total_bytes"]
        rows.append({"rank": i, "predicted_peak_bytes": predicted, "measured_peak_bytes": peak,
                     "peak_error": round(peak / predicted - 1, 4) if predicted and peak else None,
                     "predicted_kv_tokens": plan["kv_tokens"], "measured_kv_tokens": rank.get("kv_tokens"),
                     "predicted_weight_bytes": plan["weight_bytes"], "measured_weight_bytes": _decoder_weights(rank)})
    return rows


def format_comparison(rows: List[Dict[str, Any]]) -> str:
    lines = ["rank  peak planned  peak measured  error   KV tokens planned/measured  weights planned/measured"]
    for r in rows:
        error = f"{r['peak_error']:+.1%}" if r["peak_error"] is not None else "n/a"
        lines.append(f"{r['rank']:>4}  {r['predicted_peak_bytes'] / GiB:>8.2f} GiB  "
                     f"{r['measured_peak_bytes'] / GiB:>9.2f} GiB  {error:>6}   "
                     f"{r['predicted_kv_tokens']:>10} / {r['measured_kv_tokens']:<10}    "
                     f"{r['predicted_weight_bytes'] / GiB:.3f} / {(r['measured_weight_bytes'] or 0) / GiB:.3f} GiB")
    return "\n".join(lines)
