"""The schedule roofline's accounting (framework/tasks/roofline.py): a known schedule gives the
hand-computed bytes, FLOPs and floors; the engine's step log records what it really ran."""
from __future__ import annotations

import pytest

from framework import SamplingParams
from framework.engine.scheduler import ScheduledBatch
from framework.engine.sampling_params import SamplingParams as SP
from framework.engine.sequence import Sequence
from framework.engine.step_log import StepLog, StepRecord, attended_pairs, record_of
from framework.llm import LLM
from framework.tasks.profile import group_kernels, kind_of_kernel
from framework.tasks.roofline import ModelCosts, engine_costs, schedule_roofline, serial_floor, step_floor
from helpers import TINY, small_config


def test_attended_pairs_counts_the_causal_triangle():
    assert attended_pairs(1, 10) == 10  # one decode token sees all 10 keys
    assert attended_pairs(4, 4) == 1 + 2 + 3 + 4  # a whole prompt
    assert attended_pairs(3, 10) == 8 + 9 + 10  # a chunk after 7 computed tokens


def test_record_of_a_mixed_batch():
    decode = Sequence(list(range(12)), SP())
    decode.num_computed_tokens = 11  # its 12th token is new
    chunk = Sequence(list(range(40)), SP())
    chunk.num_computed_tokens = 16  # the second chunk of a prompt: 16 new tokens, not the last
    r = record_of(ScheduledBatch([decode, chunk], [1, 16]), logits_rows=1, graphed=False)
    assert r == StepRecord(tokens=17, seqs=2, logits_rows=1, context_tokens=12 + 32,
                           attended=12 + sum(range(17, 33)), graphed=False)


def test_schedule_roofline_by_hand():
    costs = ModelCosts(weight_bytes=1000, kv_bytes_per_token=10, linear_params=50, lm_head_params=20,
                       attn_flops_per_pair=4)
    decode = StepRecord(tokens=2, seqs=2, logits_rows=2, context_tokens=30, attended=30, graphed=True)
    prefill = StepRecord(tokens=8, seqs=1, logits_rows=1, context_tokens=8, attended=36, graphed=False)
    # decode: 1000 + 10 * (30 + 2) = 1320 bytes; 2*50*2 + 2*20*2 + 4*30 = 400 FLOPs
    # prefill: 1000 + 10 * (8 + 8) = 1160 bytes; 2*50*8 + 2*20*1 + 4*36 = 984 FLOPs
    assert costs.step_bytes(decode) == 1320 and costs.step_flops(decode) == 400
    assert costs.step_bytes(prefill) == 1160 and costs.step_flops(prefill) == 984
    # 1 byte/s and 2 FLOP/s: decode 1320 s (bytes) vs 200 s; prefill 1160 s (bytes) vs 492 s
    assert step_floor(decode, costs, 1.0, 2.0) == (1320.0, True)
    # 1000 bytes/s and 1 FLOP/s: decode 1.32 s vs 400 s (FLOPs)
    assert step_floor(decode, costs, 1000.0, 1.0) == (400.0, False)
    # serial: decode max(1000/1000, (200+80)/1) + max(320/1000, 120/1) = 280 + 120 = 400;
    # prefill max(1, 800 + 40) + max(0.16, 144) = 984
    assert serial_floor(decode, costs, 1000.0, 1.0) == pytest.approx(400.0)
    assert serial_floor(decode, costs, 1.0, 1e9) == pytest.approx(1000 + 320)
    # linears compute-bound while attention is bytes-bound: the serial reading adds, the step's overlaps
    light = ModelCosts(weight_bytes=10, kv_bytes_per_token=10, linear_params=50, lm_head_params=20,
                       attn_flops_per_pair=4)
    assert step_floor(decode, light, 1.0, 1.0) == (400.0, False)  # max(10 + 320, 280 + 120)
    assert serial_floor(decode, light, 1.0, 1.0) == pytest.approx(280 + 320)
    out = schedule_roofline([decode, prefill, decode], costs, 1000.0, 1.0, [500.0, 1000.0, 400.0])
    assert out["steps"] == 3 and out["floor_seconds"] == pytest.approx(400 + 984 + 400)
    assert out["serial_floor_seconds"] == pytest.approx(400 + 984 + 400)
    assert out["bytes"] == 1320 * 2 + 1160 and out["flops"] == 400 * 2 + 984
    graph, mixed = out["kinds"]["decode (graph)"], out["kinds"]["prefill (+ decode)"]
    assert (graph["steps"], graph["tokens"], graph["seconds"], graph["floor_seconds"]) == (2, 4, 900.0, 800.0)
    assert (mixed["steps"], mixed["seconds"], mixed["bytes_bound"]) == (1, 1000.0, 0)


def test_model_costs_of_a_tiny_llama(tiny_model):
    h, i, n, heads, kv, vocab = (TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "vocab_size"))
    d = h // heads
    with LLM(small_config(tiny_model("llama"))) as llm:
        costs = engine_costs(llm.launcher.local_engine())
    linear = n * (h * (heads + 2 * kv) * d + heads * d * h + 2 * h * i + i * h)
    assert costs.linear_params == linear
    assert costs.lm_head_params == vocab * h
    assert costs.attn_flops_per_pair == 4 * heads * d * n
    assert costs.kv_bytes_per_token == 2 * n * kv * d * 4  # float32 on the CPU
    norms = (2 * n + 1) * h
    assert costs.weight_bytes == 4 * (linear + vocab * h + norms)  # everything but the input embedding


def test_engine_step_log_covers_every_computed_token(tiny_model):
    prompts = [[1, 2, 3], list(range(10, 30)), [7] * 9]
    with LLM(small_config(tiny_model("llama"), max_num_batched_tokens=8)) as llm:
        engine = llm.launcher.local_engine()
        engine.step_log = log = StepLog(engine.runner.device)
        log.begin()
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    records = log.records
    assert all(r.tokens <= 8 for r in records)
    # every prompt token and every output token but the last goes through the model once
    assert sum(r.tokens for r in records) == sum(len(p) + 4 for p in prompts)
    assert sum(r.logits_rows for r in records) == 5 * len(prompts)
    assert sum(r.attended for r in records) == sum(attended_pairs(len(p) + 4, len(p) + 4) for p in prompts)
    assert log.step_seconds() == []  # device timing is CUDA only


def test_kernel_kinds():
    assert kind_of_kernel("_decode_split_kernel") == "decode attention"
    assert kind_of_kernel("_paged_attention_kernel") == "prefill/mixed attention"
    assert kind_of_kernel("_gemv_kernel") == "GEMV (1 row)"
    assert kind_of_kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "GEMM"
    assert kind_of_kernel("_rotary_store_kv_kernel") == "rotary + KV store"
    assert kind_of_kernel("_argmax_kernel") == "argmax / sampling"
    assert group_kernels({"_rms_norm_kernel": 1.0, "_fused_add_rms_norm": 2.0, "mystery": 0.5}) == \
        {"norms": 3.0, "other": 0.5}


def test_profile_names_overlap_when_kernels_outlast_the_wall():
    from framework.tasks.profile import format_profile
    gaps = format_profile({"kinds": {"GEMM": 0.8}, "wall_seconds": 1.0, "idle_seconds": 0.2})
    assert "device idle (host gaps)" in gaps[-1] and "0.200 s" in gaps[-1]
    # under programmatic dependent launch kernel times include waits: their sum passes the wall
    overlap = format_profile({"kinds": {"GEMM": 1.3}, "wall_seconds": 1.0, "idle_seconds": -0.3})
    assert "kernels overlapping (PDL)" in overlap[-1] and "-0.300 s" in overlap[-1]


def test_staged_step_fields_are_16_byte_aligned():
    """Triton specializes kernels on each pointer's 16-byte alignment: every field of a staged
    step must start aligned whatever the token and sequence counts, or the first requests compile."""
    import torch
    from framework.engine.step_input import StepInput
    from framework.engine.step_tensors import HostStaging
    staging = HostStaging(torch.device("cpu"))
    for t, b in ((7, 3), (16, 2), (5, 5), (1, 1)):
        lens = [t - (b - 1)] + [1] * (b - 1)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        step = StepInput(input_ids=list(range(t)), positions=list(range(100, 100 + t)),
                         slot_mapping=list(range(200, 200 + t)), cu_seqlens_q=cu, seq_lens=[n + 3 for n in lens],
                         block_tables=[[i, i + 1, i + 2][:1 + i % 3] for i in range(b)],
                         logits_indices=[c - 1 for c in cu[1:]], decode_only=False,
                         window_slot_mapping=list(range(300, 300 + t)), window_block_tables=[[9]] * b)
        out = staging.stage(step)
        for tensor in out:
            assert tensor.data_ptr() % 16 == 0
        assert out.input_ids.tolist() == step.input_ids and out.positions.tolist() == step.positions
        assert out.slot_mapping.tolist() == step.slot_mapping
        assert out.window_slot_mapping.tolist() == step.window_slot_mapping
        assert out.logits_indices.tolist() == step.logits_indices
        assert out.cu_seqlens_q.tolist() == cu and out.seq_lens.tolist() == step.seq_lens
        assert [row[:len(bt)] for row, bt in zip(out.block_tables.tolist(), step.block_tables)] == step.block_tables
        assert out.window_block_tables.tolist() == [[9]] * b
