"""SamplingParams refuses bad values when built; nothing a request carries stops the engine; the
LLM object stays usable after any bad call; penalties, min_tokens and logprobs against HF."""
from __future__ import annotations

import math

import pytest
import torch

from framework import SamplingParams, compose
from framework.engine import sampler
from framework.engine.sampling_params import ParamError
from framework.llm import LLM
from helpers import PROMPTS, small_config

BAD = [(dict(seed=2 ** 64), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
       (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
       (dict(temperature=-0.5), "temperature"), (dict(temperature="1"), "temperature"),
       (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"),
       (dict(min_p=1.1), "min_p"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
       (dict(stop=[1]), "stop"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
       (dict(stop_token_ids=["a"]), "stop_token_ids"), (dict(ignore_eos="no"), "ignore_eos"),
       (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(presence_penalty=2.5), "presence_penalty"),
       (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
       (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs")]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_values_are_refused_at_construction(kwargs, field):
    with pytest.raises(ParamError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field and str(info.value).startswith(field)


def test_edges_that_are_fine():
    assert SamplingParams(seed=2 ** 64 - 1).seed == 2 ** 64 - 1
    assert SamplingParams(temperature=1e-300).greedy  # tiny temperatures are greedy, not a division overflow
    assert SamplingParams(stop="x").stop == ["x"]


@pytest.fixture(scope="module")
def bundled():
    with LLM(compose(["cache.cpu_kvcache_space_gib=0.1"])) as llm:
        yield llm


def greedy_text(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(max_tokens=kw.pop("max_tokens", 12), temperature=0, **kw))[0]


def test_llm_stays_usable_after_bad_calls(bundled):
    before = greedy_text(bundled, "The for statement")
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        bundled.generate(["a", "b"], [SamplingParams()])
    outs = bundled.generate(["a", 5, {"nothing": 1}, {"prompt_token_ids": [1, 2.5]}], SamplingParams(max_tokens=2))
    assert outs[0].error is None and all(o.error and o.finish_reason == "error" for o in outs[1:])
    assert "could not read the prompt" in outs[1].error and "2.5" in outs[3].error
    assert "sampling params must be a SamplingParams" in bundled.generate("a", {"max_tokens": 3})[0].error
    tiny_t = bundled.generate("The for statement", SamplingParams(max_tokens=12, temperature=1e-300))[0]
    assert tiny_t.text == before.text  # greedy
    assert greedy_text(bundled, "The for statement").text == before.text
    assert not bundled.launcher.engine.has_work()


def test_a_failing_row_fails_only_its_request(bundled, monkeypatch):
    prompts = ["The for statement", "Comparisons", "The import statement"]
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=s) for s in (1, 13, 2)]
    alone = [bundled.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    real = sampler._sample_row

    def flaky(raw, row, gen):
        if row.params.seed == 13 and len(row.output_ids) == 3:
            raise RuntimeError("boom")
        return real(raw, row, gen)
    monkeypatch.setattr(sampler, "_sample_row", flaky)
    outs = bundled.generate(prompts, params)
    assert outs[1].finish_reason == "error" and "boom" in outs[1].error and len(outs[1].token_ids) == 3
    assert [outs[0].token_ids, outs[2].token_ids] == [alone[0], alone[2]]
    monkeypatch.undo()
    assert bundled.generate(prompts[1], params[1])[0].token_ids == alone[1]


def test_a_failing_forward_fails_its_step_and_the_engine_goes_on(bundled, monkeypatch):
    engine = bundled.launcher.engine
    expected = greedy_text(bundled, "Comparisons").token_ids
    real, calls = engine.runner.run, []

    def broken(step, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fault")
        return real(step, **kw)
    monkeypatch.setattr(engine.runner, "run", broken)
    outs = bundled.generate(["The for statement", "Comparisons"], SamplingParams(max_tokens=8, temperature=0))
    assert all(o.finish_reason == "error" and "device fault" in o.error for o in outs)
    assert all(len(o.token_ids) == 2 for o in outs)  # the tokens before the failed step stay
    assert greedy_text(bundled, "Comparisons").token_ids == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stop_string_at_the_very_start_is_removed(bundled):
    text = greedy_text(bundled, "The while statement").text
    out = greedy_text(bundled, "The while statement", stop=[text[:2]])
    assert out.text == "" and out.finish_reason == "stop"


# --- against HF transformers, float32, step by step -------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model("llama")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with LLM(small_config(model_dir)) as llm:
        yield llm, hf


def hf_steps(hf, prompt, n, process):
    """Greedy under `process(logits, prompt, outputs)`; returns tokens and raw logprob rows."""
    ids, outs, rows = list(prompt), [], []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        rows.append(logits.log_softmax(-1))
        token = int(process(logits.clone(), prompt, outs).argmax())
        outs.append(token)
        ids.append(token)
    return outs, rows


def test_penalties_match_their_formulas(tiny):
    llm, hf = tiny
    prompt = PROMPTS[1]  # [3] * 21: a repetitive prompt, so the repetition penalty bites

    def penalised(logits, prompt_ids, outs):
        seen = sorted(set(prompt_ids) | set(outs))
        v = logits[seen]
        logits[seen] = torch.where(v > 0, v / 1.8, v * 1.8)
        for t in set(outs):
            logits[t] -= 0.7 * outs.count(t) + 0.4
        return logits
    expected, _ = hf_steps(hf, prompt, 10, penalised)
    plain, _ = hf_steps(hf, prompt, 10, lambda x, p, o: x)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.8,
                            frequency_penalty=0.7, presence_penalty=0.4)
    ours = llm.generate({"prompt_token_ids": prompt}, params)[0].token_ids
    assert ours == expected and ours != plain


def test_min_tokens_masks_stop_tokens(tiny):
    llm, hf = tiny
    prompt = PROMPTS[0]
    plain, _ = hf_steps(hf, prompt, 6, lambda x, p, o: x)
    stop_at = plain[0]  # would stop at once

    def masked(logits, prompt_ids, outs):
        if len(outs) < 4:
            logits[stop_at] = -math.inf
            logits[hf.config.eos_token_id] = -math.inf
        return logits
    expected, _ = hf_steps(hf, prompt, 12, masked)
    cut = next((i for i, t in enumerate(expected) if i >= 4 and t == stop_at), len(expected) - 1)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at], min_tokens=4))[0]
    assert out.token_ids == expected[:cut + 1]
    early = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=12, temperature=0,
                                                                      stop_token_ids=[stop_at]))[0]
    assert early.token_ids == [stop_at] and early.finish_reason == "stop"


def test_logprobs_are_the_models(tiny):
    llm, hf = tiny
    prompt = PROMPTS[2]
    expected, rows = hf_steps(hf, prompt, 6, lambda x, p, o: x)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))[0]
    entries = out.outputs[0].logprobs
    assert [e.token_id for e in entries] == out.token_ids == expected
    for entry, row in zip(entries, rows):
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2))[0].outputs[0].logprobs is None


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_samples_of_one_prompt_share_its_kv(tiny_model, async_scheduling):
    """OpenAI's n: the first sample computes the prompt, the others take its full blocks and
    compute only the last partial one; each still equals its solo run."""
    prompt = list(range(10, 47))  # 37 tokens: 4 full blocks of 8 to share, 5 tokens each sample computes
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    seeded = [SamplingParams(max_tokens=6, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    with LLM(small_config(tiny_model("llama"), async_scheduling=async_scheduling)) as llm:
        engine = llm.launcher.engine
        alone = [llm.generate({"prompt_token_ids": prompt}, p)[0].token_ids for p in [greedy, *seeded]]
        computed, real_schedule = [], engine.scheduler.schedule

        def counting():
            batch = real_schedule()
            computed.append(batch.num_tokens)
            return batch
        engine.scheduler.schedule = counting
        seqs = engine.add_request_group({"prompt_token_ids": prompt}, [greedy, *seeded])
        shared = []
        while engine.has_work():
            engine.step()
            if not shared and all(s.block_table for s in seqs):
                shared = [s.block_table[:4] for s in seqs]
                refs = [engine.block_manager.ref_counts[b] for b in shared[0]]
        assert shared[1] == shared[2] == shared[0] and refs == [3] * 4
        assert [engine.output(s).token_ids for s in seqs] == alone
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        if not async_scheduling:  # the prompt once, 5 tokens for each other sample, 5 decodes each
            assert sum(computed) == 37 + 2 * 5 + 3 * 5


def test_an_aborted_sample_that_waits_for_its_prompt(tiny_model):
    with LLM(small_config(tiny_model("llama"))) as llm:
        engine = llm.launcher.engine
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        first, second, third = engine.add_request_group({"prompt_token_ids": PROMPTS[2]}, [params] * 3)
        engine.abort(second)  # still waiting for the first's prompt
        assert second.finish_reason == "abort"
        engine.abort(first)  # before its prompt was computed: the third computes its own
        while engine.has_work():
            engine.step()
        assert third.finish_reason == "length" and len(third.output_token_ids) == 4
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks and not engine.forks
