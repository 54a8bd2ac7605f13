"""`GET /metrics` in Prometheus' text format, and the serving figures of metrics.json.

Counters and histograms are updated by the engine loop once a step (a StepFigures: a lock and a
wake-up per token would cost more than the step at hundreds of streams); the gauges (running and
waiting requests, KV-cache use, preemptions) are read from the engine when Prometheus scrapes,
as are the plan's memory figures beside the ones measured then (peak allocated and device use
on a GPU, peak RSS on the CPU). Each server has its own registry, so
two servers in one process (the tests) do not share numbers.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from framework.engine.llm_engine import LLMEngine

disable_created_metrics()  # no *_created series: a scrape shows the figures, not object creation times
PREFIX = "framework"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


@dataclass
class StepFigures:
    """What one engine step (and the requests admitted or aborted before it) adds to the counters
    and histograms."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: List[float] = field(default_factory=list)  # seconds, one per request that got its first token
    itl: List[float] = field(default_factory=list)  # seconds, one per later token
    finish_reasons: List[str] = field(default_factory=list)


class StepHistogram:
    """A Prometheus histogram fed a step's values at once by one writer (the engine loop): bucket
    counts in a plain list, read when scraped (a scrape between two additions is off by one step
    at most, which Prometheus' own counters allow too)."""

    def __init__(self, name: str, documentation: str, buckets: tuple, registry: CollectorRegistry):
        self.name, self.documentation, self.bounds = name, documentation, list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values: List[float]) -> None:
        for value in values:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += sum(values)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self):
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds + [float("inf")], list(self.counts)):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class EngineCollector:
    """Gauges read from the engine at scrape time (a few len() calls; racy reads are harmless)."""

    def __init__(self, engine: LLMEngine, plan: Any, measured: Callable[[], Dict[str, float]]):
        self.engine, self.plan, self.measured = engine, plan, measured

    def collect(self):
        g = self.engine.gauges()
        yield GaugeMetricFamily(f"{PREFIX}_requests_running", "Requests in the running batch", g["running"])
        yield GaugeMetricFamily(f"{PREFIX}_requests_waiting", "Requests waiting to be scheduled", g["waiting"])
        used = 1 - g["free_blocks"] / max(1, g["num_blocks"])
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1)", used)
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_blocks", "KV-cache blocks in all", g["num_blocks"])
        yield CounterMetricFamily(f"{PREFIX}_preemptions", "Sequences preempted (recomputed later)",
                                  g["preemptions"])
        memory = GaugeMetricFamily(f"{PREFIX}_memory_bytes", "Memory per rank: the plan beside what was measured",
                                   labels=["source", "part"])
        for part, value in plan_figures(self.plan).items():
            memory.add_metric(["plan", part], value)
        for part, value in self.measured().items():
            memory.add_metric(["measured", part], value)
        yield memory


def plan_figures(plan: Any) -> Dict[str, float]:
    """The plan's bytes per part (None when no plan was made, e.g. a CPU-only driver)."""
    if plan is None:
        return {}
    return {"weights": float(plan.weight_bytes), "kv_cache": float(plan.kv_cache_bytes),
            "activations": float(plan.activation_bytes), "cuda_graphs": float(plan.graph_pool_bytes),
            "total": float(plan.rank_total_bytes)}


def measured_figures(rank: Dict[str, Any]) -> Dict[str, float]:
    """rank_stats' bytes under the plan's part names, where the two can be compared."""
    names = {"weight_bytes": "weights", "kv_bytes": "kv_cache", "peak_allocated_bytes": "peak_allocated",
             "device_used_bytes": "total", "peak_rss_bytes": "total"}
    return {part: float(rank[key]) for key, part in names.items() if isinstance(rank.get(key), (int, float))}


class ServeMetrics:
    def __init__(self, engine: LLMEngine, plan: Any = None,
                 measured: Optional[Callable[[], Dict[str, float]]] = None):
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter(f"{PREFIX}_requests_finished", "Requests finished, by reason",
                                ["finish_reason"], registry=self.registry)
        self.ttft = StepHistogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first token",
                                  LATENCY_BUCKETS, self.registry)
        self.itl = StepHistogram(f"{PREFIX}_inter_token_latency_seconds", "Between two tokens of one request",
                                 LATENCY_BUCKETS, self.registry)
        self.registry.register(EngineCollector(engine, plan, measured or dict))

    def record_step(self, step: StepFigures) -> None:
        if step.prompt_tokens:
            self.prompt_tokens.inc(step.prompt_tokens)
        if step.generation_tokens:
            self.generation_tokens.inc(step.generation_tokens)
        self.ttft.observe_many(step.ttft)
        self.itl.observe_many(step.itl)
        for reason in step.finish_reasons:
            self.requests.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def summary(self) -> Dict[str, Any]:
        """The serving figures for metrics.json."""
        def total(name: str) -> float:
            return sum(s.value for m in self.registry.collect() if m.name == name
                       for s in m.samples if s.name in (name + "_total", name))

        def histogram(h: StepHistogram) -> Dict[str, float]:
            count = h.count
            return {"count": float(count), "mean_s": h.sum / count if count else None}
        finished = {}
        for metric in self.registry.collect():
            if metric.name == f"{PREFIX}_requests_finished":
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        finished[s.labels["finish_reason"]] = s.value
        return {"prompt_tokens": total(f"{PREFIX}_prompt_tokens"),
                "generation_tokens": total(f"{PREFIX}_generation_tokens"),
                "requests_finished": finished, "time_to_first_token": histogram(self.ttft),
                "inter_token_latency": histogram(self.itl)}
