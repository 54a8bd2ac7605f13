"""The CPU engine against HF transformers, token for token, and under every scheduling regime."""
from __future__ import annotations

import pytest

from framework import SamplingParams
from framework.llm import LLM
from helpers import PROMPTS, greedy, hf_greedy, small_config

MAX_TOKENS = 10


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "mistral", "granite"])
def test_matches_hf_greedy(tiny_model, arch):
    model_dir = tiny_model(arch)
    ours, _ = greedy(small_config(model_dir))
    assert ours == hf_greedy(model_dir, PROMPTS)


@pytest.fixture(scope="module")
def reference(tiny_model):
    model_dir = tiny_model("llama")
    return model_dir, hf_greedy(model_dir, PROMPTS)


# async: step N+1 is scheduled before step N's tokens reach the host (on by default on CUDA only)
ASYNC = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


@ASYNC
def test_one_seat_equals_many(reference, async_scheduling):
    model_dir, expected = reference
    assert greedy(small_config(model_dir, max_num_seqs=1, async_scheduling=async_scheduling))[0] == expected
    assert greedy(small_config(model_dir, max_num_seqs=8, async_scheduling=async_scheduling))[0] == expected


@ASYNC
def test_chunked_prefill(reference, async_scheduling):
    model_dir, expected = reference
    # 7 tokens a step: every prompt but the shortest is prefilled in several chunks
    cfg = small_config(model_dir, max_num_batched_tokens=7, async_scheduling=async_scheduling)
    assert greedy(cfg)[0] == expected


@ASYNC
def test_preemption_under_kv_pressure(reference, async_scheduling):
    model_dir, expected = reference
    # 12 blocks of 8 tokens: the 64-token prompt alone needs 10 once it generates; others must yield
    ours, ranks = greedy(small_config(model_dir, num_gpu_blocks_override=12, max_num_seqs=8, max_model_len=96,
                                      async_scheduling=async_scheduling))
    assert ours == expected
    assert ranks[0]["num_preemptions"] > 0


@ASYNC
def test_prefix_caching_reuses_blocks_and_keeps_outputs(reference, async_scheduling):
    model_dir, _ = reference
    shared = list(range(50, 90))
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    expected = hf_greedy(model_dir, prompts, 6)
    cfg = small_config(model_dir, enable_prefix_caching=True, max_num_seqs=1, async_scheduling=async_scheduling)
    with LLM(cfg) as llm:
        engine = llm.launcher.engine
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in outs] == expected
        assert len(engine.block_manager.hash_to_block) >= len(shared) // cfg.cache.block_size


def _mutated(params: SamplingParams, **changes) -> SamplingParams:
    for key, value in changes.items():
        setattr(params, key, value)
    return params


def test_bad_requests_fail_alone(reference):
    model_dir, expected = reference
    cfg = small_config(model_dir, max_model_len=64)
    bad = [{"prompt_token_ids": []}, {"prompt_token_ids": list(range(80))},
           {"prompt_token_ids": [1, 10_000]}, {"prompt_token_ids": [1, 2]}]
    good = PROMPTS[:3]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)] * 3 + \
             [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)] * 3 + \
             [_mutated(SamplingParams(), max_tokens=0)]  # construction refuses it; a later change is caught too
    prompts = [{"prompt_token_ids": p} for p in good] + bad
    with LLM(cfg) as llm:
        outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs[:3]] == expected[:3]
    errors = [o.error for o in outs[3:]]
    assert all(o.finish_reason == "error" for o in outs[3:])
    assert "empty" in errors[0]
    assert "80 tokens" in errors[1] and "max_model_len=64" in errors[1]
    assert "10000" in errors[2] and "vocabulary" in errors[2]
    assert "max_tokens=0" in errors[3]


@ASYNC
def test_generation_stops_at_max_model_len(reference, async_scheduling):
    model_dir, _ = reference
    with LLM(small_config(model_dir, max_model_len=40, async_scheduling=async_scheduling)) as llm:
        out = llm.generate({"prompt_token_ids": list(range(10, 47))},
                           SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible(reference):
    model_dir, _ = reference

    def run(seed, batch_mates):
        prompts = [{"prompt_token_ids": p} for p in [PROMPTS[0]] + batch_mates]
        params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=seed)]
        params += [SamplingParams(max_tokens=12, temperature=0.8)] * len(batch_mates)
        with LLM(small_config(model_dir)) as llm:
            return llm.generate(prompts, params)[0].token_ids

    first = run(7, [])
    assert run(7, PROMPTS[1:3]) == first  # batch mates do not change a seeded request
    assert run(8, []) != first


@ASYNC
def test_stop_token_ids(reference, async_scheduling):
    model_dir, expected = reference
    stop_at = expected[0][3]
    with LLM(small_config(model_dir, async_scheduling=async_scheduling)) as llm:
        out = llm.generate({"prompt_token_ids": PROMPTS[0]},
                           SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == expected[0][:expected[0].index(stop_at) + 1] and out.finish_reason == "stop"


def test_async_step_runs_ahead_of_its_tokens(reference):
    """With async scheduling a greedy step stays pending (its token a placeholder) until the next
    step has been launched; a sampled request in the batch makes its step resolve at once, and
    the greedy outputs beside it do not change."""
    model_dir, expected = reference
    with LLM(small_config(model_dir, async_scheduling=True)) as llm:
        engine = llm.launcher.engine
        seq = engine.add_request({"prompt_token_ids": PROMPTS[0]},
                                 SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        engine.step()
        assert engine.pending is not None and seq.token_ids[-1] == -1  # row 0's token, not yet on the host
        engine.step()
        assert seq.token_ids[-2] == expected[0][0] and seq.token_ids[-1] == -1
        greedy_params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        sampled_params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[1:3]], [greedy_params, sampled_params])
        assert outs[0].token_ids == expected[1] and len(outs[1].token_ids) == MAX_TOKENS
        assert engine.pending is None and not engine.has_work()
        assert seq.is_finished and seq.output_token_ids == expected[0]  # finished while the others ran
