"""The GPU backend (Triton kernels, CUDA graphs, torch.compile) against HF transformers, and the
GPU memory accounting. Tests marked `gpu` are skipped without CUDA; the others (capture sizes,
the KV shortfall message) run everywhere."""
from __future__ import annotations

import pytest
import torch

from framework import FrameworkConfig, SamplingParams
from framework.config.errors import UserError
from framework.resolve import capture_sizes, default_capture_sizes
from framework.engine.sequence import Sequence
from framework.engine.step_input import StepInput
from framework.llm import LLM
from helpers import PROMPTS, hf_greedy

MAX_TOKENS = 12


def gpu_config(model_dir, dtype="float32", compilation="graphs", **cache) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path, cfg.model.device, cfg.model.dtype = str(model_dir), "cuda", dtype
    cfg.cache.block_size, cfg.cache.max_model_len, cfg.cache.max_num_seqs = 8, 256, 8
    cfg.cache.max_num_batched_tokens, cfg.cache.gpu_memory_utilization = 256, 0.5
    cfg.compilation.enforce_eager = compilation == "eager"
    cfg.compilation.level = 3 if compilation == "piecewise" else 0
    for key, value in cache.items():
        setattr(cfg.cache, key, value)
    return cfg


# --- everywhere ---------------------------------------------------------------------------
def test_default_capture_sizes():
    assert default_capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 8))
    assert default_capture_sizes(1000)[-1] == 256
    assert default_capture_sizes(5) == [1, 2, 4, 5]  # every batch the scheduler forms has a graph
    assert default_capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes([1, 2, 4, 8, 16], 6) == [1, 2, 4, 8]  # 16 could never be replayed
    assert capture_sizes([16], 8) == [16]


def test_kv_shortfall_names_the_largest_fit_and_the_fixes(tiny_model):
    cfg = FrameworkConfig()
    cfg.model.path = str(tiny_model("llama"))
    cfg.cache.block_size, cfg.cache.num_gpu_blocks_override, cfg.cache.max_model_len = 8, 4, 64
    with pytest.raises(UserError) as err:
        LLM(cfg)
    text = str(err.value)
    assert "holds 32 tokens" in text and "largest cache.max_model_len that fits is 32" in text
    assert "cache.num_gpu_blocks_override=8" in text


# --- GPU ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_model):
    model_dir = tiny_model("llama3")
    return model_dir, hf_greedy(model_dir, PROMPTS, MAX_TOKENS)


@pytest.mark.gpu
@pytest.mark.parametrize("compilation", ["eager", "graphs", "piecewise"])
def test_greedy_matches_hf_fp32(reference, compilation):
    model_dir, expected = reference
    with LLM(gpu_config(model_dir, compilation=compilation)) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        runner = llm.launcher.engine.runner
        stats = llm.stats()["ranks"][0]
    assert [o.token_ids for o in outs] == expected
    if compilation == "eager":
        assert runner.graphs is None and stats["cudagraph_estimate_bytes"] == 0
    else:  # the 5 prompts decode together, padded to the graph of 8
        assert runner.graphs.replays >= MAX_TOKENS - 1
        assert stats["cudagraph_sizes"] == [1, 2, 4, 8]
        assert stats["cudagraph_bytes"] > 0 and stats["cudagraph_estimate_bytes"] > 0
        assert stats["cudagraph_capture_seconds"] > 0


@pytest.mark.gpu
def test_uneven_batches_through_graphs(reference):
    """Requests of different lengths: decode batches shrink 5 -> 1 through padded graphs."""
    model_dir, _ = reference
    lengths = [3, 12, 7, 1, 10]
    expected = [hf_greedy(model_dir, [p], n)[0] for p, n in zip(PROMPTS, lengths)]
    with LLM(gpu_config(model_dir)) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths])
    assert [o.token_ids for o in outs] == expected


@pytest.mark.gpu
def test_seeded_sampling_on_gpu_logits(reference):
    model_dir, _ = reference
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    with LLM(gpu_config(model_dir)) as llm:
        first = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params)[0].token_ids
        again = llm.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}],
                             [params, SamplingParams(max_tokens=10, temperature=0.7)])[0].token_ids
    assert first == again


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.gpu
def test_bf16_logits_close_to_hf(tiny_model):
    """A bigger random Llama 3 in bf16: prefill logits (eager) and one decode step (CUDA graph)
    against HF in fp32; the yardstick is HF itself in bf16."""
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model("llama3", vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                           num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                           max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 8192, (96,), generator=gen).tolist()
    n = len(prompt)
    with torch.inference_mode():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        want = ref(torch.tensor([prompt], device="cuda")).logits[0].float().cpu()
        del ref
        hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        hf_bf16 = hf16(torch.tensor([prompt], device="cuda")).logits[0].float().cpu()
        del hf16
    torch.cuda.empty_cache()

    cfg = gpu_config(model_dir, dtype="bfloat16", block_size=16, max_model_len=512)
    with LLM(cfg) as llm:
        engine = llm.launcher.engine
        seq = Sequence(list(prompt), SamplingParams(max_tokens=1))
        engine.block_manager.allocate(seq, n)
        bs, table = engine.block_size, seq.block_table
        slots = [table[p // bs] * bs + p % bs for p in range(n)]
        prefill = StepInput(prompt[:-1], list(range(n - 1)), slots[:-1], [0, n - 1], [n - 1], [table],
                            list(range(n - 1)), decode_only=False)
        decode = StepInput(prompt[-1:], [n - 1], slots[-1:], [0, 1], [n], [table], [0], decode_only=True)
        ours = torch.cat([engine.runner.run(prefill), engine.runner.run(decode)])
        assert engine.runner.graphs.replays == 1
        engine.block_manager.free_blocks(seq)
    err, yardstick = _relative_error(ours, want), _relative_error(hf_bf16, want)
    assert err < 2 * yardstick + 5e-3, (err, yardstick)
    decode_err = _relative_error(ours[-1:], want[-1:])
    assert decode_err < 2 * _relative_error(hf_bf16[-1:], want[-1:]) + 5e-3, decode_err


@pytest.mark.gpu
def test_kv_shortfall_on_gpu_suggests_memory_overrides(tiny_model):
    cfg = gpu_config(tiny_model("llama"), gpu_memory_utilization=0.005)
    with pytest.raises(UserError) as err:
        LLM(cfg)
    text = str(err.value)
    assert "cache.gpu_memory_utilization=" in text and "compilation.enforce_eager=true" in text
