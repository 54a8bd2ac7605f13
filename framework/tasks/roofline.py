"""The schedule roofline: the least time the steps the engine actually ran could have taken.

For each step (engine/step_log.StepRecord) the floor is the larger of
  bytes / copy bandwidth:  every weight a step reads (all but the input embedding table), plus the
                           K/V its attention reads (each sequence's whole context, once) and writes
                           (its new tokens);
  FLOPs / matmul peak:     2 x (linear-layer parameters) x tokens + 2 x (LM-head parameters) x
                           logits rows + 4 x heads x head_dim x layers per attended (query, key) pair
                           (QK^T and PV).
Both ceilings are measured in the same process (bench: a device copy and a bf16 GEMM). The sum
over steps is the schedule's roofline: what this schedule would cost on a perfect engine. It says
nothing about a better schedule (fewer, fuller steps), which bench's tok/s shows instead.
`serial_floor` is a stricter second figure: linears and attention each at their own bound, in turn.

Activations, logits and norms are left out (small beside the weights and K/V at these shapes);
sliding-window layers are counted as full attention, which overstates their bytes and FLOPs.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch

from framework.engine.step_log import StepRecord


@dataclass(frozen=True)
class ModelCosts:
    """Per-rank figures of one model, what a step's floor is computed from."""
    weight_bytes: int  # read by every step
    kv_bytes_per_token: int  # K and V of one token, all layers
    linear_params: int  # multiply-adds per token in the layers' linears (logical shape, any storage)
    lm_head_params: int  # multiply-adds per logits row
    attn_flops_per_pair: int  # FLOPs per (query, key) pair, all layers and heads

    def step_bytes(self, r: StepRecord) -> int:
        return self.weight_bytes + self.kv_bytes_per_token * (r.context_tokens + r.tokens)

    def step_flops(self, r: StepRecord) -> int:
        return (2 * self.linear_params * r.tokens + 2 * self.lm_head_params * r.logits_rows
                + self.attn_flops_per_pair * r.attended)


def model_costs(model: torch.nn.Module, kv_bytes_per_token: int, attn_layers: Sequence[Any]) -> ModelCosts:
    """From the built model: the weights a text step reads (all but vision towers and an input
    embedding table that is not also the LM head: a step reads one row of it), linears by their
    logical [out, in] (quantized storage counts its multiply-adds, not its bytes), the LM head
    by its weight, attention by its layers' heads."""
    from framework.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from framework.layers.linear import LinearBase
    from framework.memory.measure import weight_bytes
    towers = getattr(model, "vision_modules", lambda: [])()
    skip = {id(m) for tower in towers for m in tower.modules()}
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    head_weights = {id(m.weight) for m in heads}
    tables = {id(m.weight): m.weight for m in model.modules()
              if type(m) is VocabParallelEmbedding and id(m.weight) not in head_weights}
    unread = sum(weight_bytes(t) for t in towers) + sum(w.numel() * w.element_size() for w in tables.values())
    linear = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, LinearBase) and id(m) not in skip)
    head = sum(m.weight.shape[0] * m.weight.shape[1] for m in heads)
    attn = sum(4 * layer.num_heads * layer.head_dim for layer in attn_layers)
    return ModelCosts(weight_bytes(model) - unread, kv_bytes_per_token, linear, head, attn)


def engine_costs(engine: Any) -> ModelCosts:
    runner, spec = engine.runner, engine.runner.kv_spec
    per_token = (spec.num_layers + spec.num_window_layers) * spec.layer_block_bytes // spec.block_size
    return model_costs(runner.model, per_token, runner.attn_layers)


@dataclass
class StepKind:
    """Steps of one kind summed: how many, the engine's device time, and their floor."""
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    floor_seconds: float = 0.0
    bytes_bound: int = 0  # steps whose floor is the bytes term


def kind_of(r: StepRecord) -> str:
    if r.tokens == r.seqs:
        return "decode (graph)" if r.graphed else "decode (eager)"
    return "prefill (+ decode)"


def step_floor(r: StepRecord, costs: ModelCosts, copy_Bps: float, matmul_flops: float) -> tuple[float, bool]:
    """(seconds, whether the bytes term is the larger)."""
    t_bytes, t_flops = costs.step_bytes(r) / copy_Bps, costs.step_flops(r) / matmul_flops
    return max(t_bytes, t_flops), t_bytes >= t_flops


def serial_floor(r: StepRecord, costs: ModelCosts, copy_Bps: float, matmul_flops: float) -> float:
    """A second, stricter reading: the linears (weights against their FLOPs) and attention (K/V
    against its FLOPs) each at their own bound, one after the other, as kernels that run in
    sequence do. step_floor lets a full decode batch's matmul work hide under its K/V reads."""
    linear_flops = 2 * costs.linear_params * r.tokens + 2 * costs.lm_head_params * r.logits_rows
    kv_bytes = costs.kv_bytes_per_token * (r.context_tokens + r.tokens)
    return (max(costs.weight_bytes / copy_Bps, linear_flops / matmul_flops)
            + max(kv_bytes / copy_Bps, costs.attn_flops_per_pair * r.attended / matmul_flops))


def schedule_roofline(records: Sequence[StepRecord], costs: ModelCosts, copy_Bps: float, matmul_flops: float,
                      step_seconds: Sequence[float] = ()) -> Dict[str, Any]:
    """The sum of the steps' floors, and per kind of step (with the engine's device time per kind
    when `step_seconds`, one per record, is given)."""
    kinds: Dict[str, StepKind] = {}
    total = serial = 0.0
    for i, r in enumerate(records):
        floor, by_bytes = step_floor(r, costs, copy_Bps, matmul_flops)
        total += floor
        serial += serial_floor(r, costs, copy_Bps, matmul_flops)
        k = kinds.setdefault(kind_of(r), StepKind())
        k.steps += 1
        k.tokens += r.tokens
        k.floor_seconds += floor
        k.bytes_bound += by_bytes
        if step_seconds:
            k.seconds += step_seconds[i]
    return {"steps": len(records), "floor_seconds": total, "serial_floor_seconds": serial,
            "bytes": sum(costs.step_bytes(r) for r in records),
            "flops": sum(costs.step_flops(r) for r in records),
            "kinds": {name: vars(k) for name, k in kinds.items()}}


def format_kinds(kinds: Dict[str, Dict[str, Any]]) -> List[str]:
    lines = [f"    {'step kind':<18}{'steps':>7}{'tokens':>10}{'device s':>10}{'floor s':>9}{'share':>7}"
             f"{'bytes-bound':>13}"]
    for name, k in sorted(kinds.items()):
        share = f"{100 * k['floor_seconds'] / k['seconds']:.0f}%" if k["seconds"] else "n/a"
        lines.append(f"    {name:<18}{k['steps']:>7}{k['tokens']:>10}{k['seconds']:>10.3f}"
                     f"{k['floor_seconds']:>9.3f}{share:>7}{k['bytes_bound']:>13}")
    return lines


def matmul_peak(device: torch.device, n: int = 8192, iters: int = 20, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an n^3 matmul on random data (zeros run faster), median of `iters`; inputs
    rotate over four pairs so the L2 cache never holds them."""
    pairs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
             for _ in range(4)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    for a, b in pairs:
        torch.matmul(a, b, out=out)
    times = []
    for i in range(iters):
        a, b = pairs[i % len(pairs)]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    del pairs, out
    torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(times)
