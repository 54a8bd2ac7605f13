"""Gemma-3's decoder against HF transformers, token for token under greedy decoding: prompts
longer than the sliding window, chunked prefill, preemption, and the multimodal checkpoint run
on text alone."""
from __future__ import annotations

import pytest
import torch

from framework import FrameworkConfig
from framework.config.errors import UserError
from framework.llm import LLM

WINDOW = 8  # tokens; prompts and outputs run well past it
# Longer than the window, and than a 16-token chunk; one prompt shorter than the window.
PROMPTS = [list(range(10, 47)), [5, 9, 3], [7] * 12 + list(range(100, 130)), list(range(200, 222))]

TEXT = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,  # != head_dim: the scale is read from it
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}},
            final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _randomize_norms(model: torch.nn.Module) -> None:
    """HF starts every Gemma norm at weight 0 (scale 1): random offsets test the (1 + w)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)


def hf_expected(model, prompts, max_tokens):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def gemma3_text(tmp_path_factory):
    import transformers as tf
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**TEXT)).eval()
    _randomize_norms(model)
    path = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(path)
    return path, hf_expected(model, PROMPTS, 12)


def _cfg(path, **cache) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path = str(path)
    cfg.cache.cpu_kvcache_space_gib, cfg.cache.block_size = 0.05, 4
    for key, value in cache.items():
        setattr(cfg.cache, key, value)
    return cfg


def _greedy(cfg, prompts, max_tokens):
    from framework import SamplingParams
    with LLM(cfg) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return [o.token_ids for o in outs], {"config": llm.config, **llm.stats()}


def test_gemma3_text_matches_hf_past_the_window(gemma3_text):
    path, expected = gemma3_text
    ours, run = _greedy(_cfg(path), PROMPTS, 12)
    assert ours == expected
    assert run["config"].cache.max_model_len == 256  # the full context, not cut to the window


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_gemma3_chunked_prefill_past_the_window(gemma3_text, async_scheduling):
    """5-token chunks: a chunk's queries reach back into keys of earlier chunks, partly out of
    their window."""
    path, expected = gemma3_text
    ours, _ = _greedy(_cfg(path, max_num_batched_tokens=5, async_scheduling=async_scheduling), PROMPTS, 12)
    assert ours == expected


def test_gemma3_preemption_past_the_window(gemma3_text):
    """14 blocks of 4 tokens: the 42-token prompt alone needs 14 once it generates; the others
    are preempted and recomputed."""
    path, expected = gemma3_text
    ours, run = _greedy(_cfg(path, num_gpu_blocks_override=14, max_num_seqs=4, max_model_len=56), PROMPTS, 12)
    assert ours == expected
    assert run["ranks"][0]["num_preemptions"] > 0


def test_gemma3_prefix_caching_past_the_window(gemma3_text):
    import transformers as tf
    path, _ = gemma3_text
    shared = list(range(50, 70))
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    model = tf.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = hf_expected(model, prompts, 6)
    ours, _ = _greedy(_cfg(path, enable_prefix_caching=True, max_num_seqs=1), prompts, 6)
    assert ours == expected


def test_gemma3_multimodal_checkpoint_runs_its_decoder_on_text(tmp_path):
    """Gemma3ForConditionalGeneration with every modality at 0: its decoder (language_model.model.*)
    alone, the SigLIP tower never built nor read (the folder has no processor, none is needed);
    HF's text-only outputs matched."""
    import transformers as tf
    torch.manual_seed(1)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=7)
    config = tf.Gemma3Config(text_config=TEXT, vision_config=vision, mm_tokens_per_image=4,
                             image_token_index=380, boi_token_index=381, eoi_token_index=382)
    hf = tf.Gemma3ForConditionalGeneration(config).eval()
    _randomize_norms(hf)
    hf.save_pretrained(tmp_path)
    expected = hf_expected(hf, PROMPTS, 10)
    cfg = _cfg(tmp_path)
    cfg.multimodal.limit_mm_per_prompt = {"image": 0}
    ours, run = _greedy(cfg, PROMPTS, 10)
    assert ours == expected
    assert run["config"].cache.max_model_len == 256


def test_gemma3_refuses_what_it_does_not_run(tmp_path):
    import transformers as tf
    from framework.models.context import ModelContext
    from framework.models.interface import build_model
    config = tf.Gemma3TextConfig(**{**TEXT, "attn_logit_softcapping": 50.0}, architectures=["Gemma3ForCausalLM"])
    with pytest.raises(UserError, match="attn_logit_softcapping is not supported"):
        build_model(ModelContext(config), "meta")


def test_gemma3_layers_get_their_window_and_rope():
    import transformers as tf
    from framework.models.context import ModelContext
    from framework.models.interface import attention_specs, build_model
    config = tf.Gemma3TextConfig(**TEXT, architectures=["Gemma3ForCausalLM"])
    model = build_model(ModelContext(config), "meta")
    assert [s.sliding_window for s in attention_specs(model)] == [WINDOW, None, WINDOW]
    # older configs: rope_theta + rope_scaling global, rope_local_base_freq local, a layer pattern
    from framework.models.gemma3 import Gemma3Args

    class Old:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers = 8, 8, 8, 7
        num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps = 2, 1, 4, 1e-6
        max_position_embeddings, sliding_window, query_pre_attn_scalar = 64, 4, 4
        rope_theta, rope_local_base_freq = 1e6, 1e4
        rope_scaling = {"type": "linear", "factor": 8.0}
        sliding_window_pattern = 6
    a = Gemma3Args.from_hf(Old(), True)
    assert a.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert a.rope_global == {"type": "linear", "factor": 8.0, "rope_type": "linear", "rope_theta": 1e6}
    assert a.rope_local == {"rope_type": "default", "rope_theta": 1e4}


def test_gemma3_27b_shape_plans_its_two_layer_kinds():
    """The shipped Gemma-3-27B shape: the decoder's weights equal HF's own model's (built on meta),
    the context is the model's full 131,072 tokens, and the KV layout is counted per layer kind."""
    import transformers as tf
    from framework.memory.planner import GiB, plan_memory
    from framework.resolve import model_max_len
    from test_planner import SHAPES, plan_config
    hf = tf.AutoConfig.from_pretrained(SHAPES / "gemma-3-27b")
    with torch.device("meta"):
        model = tf.Gemma3ForConditionalGeneration(hf)
    text = sum(p.numel() for n, p in model.named_parameters()
               if "vision_tower" not in n and "multi_modal_projector" not in n)
    assert model_max_len(hf) == 131072
    cfg = plan_config("gemma-3-27b", max_model_len=32768)
    cfg.multimodal.limit_mm_per_prompt = {"image": 0}
    cfg.cache.max_num_batched_tokens = 2048  # the split below counts a 2048-token step (141 GiB would pick 8192)
    plan = plan_memory(cfg, hf, 141 * GiB)
    assert plan.weight_bytes == 2 * text  # bf16, embeddings tied
    per_layer = 2 * 16 * 128 * 2  # K and V, 16 KV heads of 128, bf16
    k = plan.kv_layout
    assert (k["num_full_layers"], k["num_sliding_layers"], k["sliding_window"]) == (10, 52, [1024])
    assert plan.kv_bytes_per_token == 62 * per_layer
    for n in (32768, 131072):
        kept = (1024 // 16 + 1) * 16  # a window layer keeps the 65 blocks its window can reach
        assert k[f"per_context_token_windowed_{n}"] == (10 * per_layer * n + 52 * per_layer * kept) / n
        assert k[f"per_context_token_all_full_{n}"] == 62 * per_layer
    assert "sliding-window layers (window [1024])" in plan.format_table()
    # the KV budget split as the engine splits it: R requests of 2048 full blocks (10 layers) and
    # 67 window blocks (52 layers) each, plus one 2048-token step's 128 window blocks
    budget = plan.budget_bytes - (plan.rank_total_bytes - plan.kv_cache_bytes)  # what is left for KV
    full_block, window_block = 10 * per_layer * 16, 52 * per_layer * 16
    requests = (budget - 128 * window_block) / (2048 * full_block + 67 * window_block)
    assert plan.kv_tokens == int(requests * 2048) * 16
    assert abs(plan.max_concurrency - requests) < 0.01 and plan.max_concurrency > 4 * budget / (62 * per_layer * 32768)


@pytest.mark.slow
def test_gemma3_through_the_triton_kernels(gemma3_text, monkeypatch):
    """The same model through the Triton kernels (the interpreter on a CPU machine): windowed
    prefill in 5-token chunks and windowed split-K decode match HF."""
    monkeypatch.setenv("KERNELS_FORCE_TRITON", "1")
    path, expected = gemma3_text
    ours, _ = _greedy(_cfg(path, max_num_batched_tokens=5), PROMPTS[:2], 10)
    assert ours == [e[:10] for e in expected[:2]]


def test_window_layers_blocks_grow_with_the_window_not_the_context(gemma3_text):
    """Full layers keep every block of the context; window layers keep only the blocks their
    window (8 tokens, blocks of 4) can still reach, the others going back to their pool."""
    from framework import SamplingParams
    path, expected = gemma3_text
    with LLM(_cfg(path, max_num_batched_tokens=6)) as llm:
        engine = llm.launcher.engine
        bm = engine.block_manager
        assert bm.window is not None and llm.stats()["ranks"][0]["kv_window_blocks"] > 0
        window_free = bm.num_free_window_blocks
        seq = engine.add_request({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=12, temperature=0,
                                                                                  ignore_eos=True))
        most_live = 0
        while engine.has_work():
            engine.step()
            live = [b for b in seq.window_block_table if b >= 0]
            if seq.is_finished:
                break
            assert len(seq.block_table) == -(-seq.num_computed_tokens // 4)  # the whole context
            assert window_free - bm.num_free_window_blocks == len(live)  # freed blocks are back in the pool
            most_live = max(most_live, len(live))
        assert seq.output_token_ids == expected[0]
        assert seq.num_tokens == 49 and most_live <= 2 + -(-(WINDOW - 1 + 6) // 4)  # window + one chunk
        assert bm.num_free_window_blocks == window_free  # all back once it finished


def test_prefix_hit_needs_the_window_blocks_of_its_last_window():
    """A prefix hit of k blocks adopts full blocks 0..k-1 and only the window blocks its last
    window reaches; a window block that was reused elsewhere cuts the hit back."""
    from framework.engine.block_manager import BlockManager
    from framework.engine.sequence import Sequence
    from framework import SamplingParams
    bm = BlockManager(32, 4, enable_prefix_caching=True, num_window_blocks=8, sliding_window=8)
    first = Sequence(list(range(100, 124)), SamplingParams())
    bm.allocate(first, 24)
    first.num_computed_tokens = 24
    bm.register_full_blocks(first)
    bm.allocate(first, 1)  # its window moves on: blocks 0..3 leave it
    assert first.window_block_table[:4] == [-1] * 4 and all(b >= 0 for b in first.window_block_table[4:])
    second = Sequence(list(range(100, 124)) + [7], SamplingParams())
    bm.reuse_cached_prefix(second)
    assert second.num_computed_tokens == 24 and second.block_table == first.block_table[:6]
    # position 24's window is 17..24: blocks 4 and 5 (tokens 16..23)
    assert second.window_block_table == [-1] * 4 + first.window_block_table[4:6]
    bm.free_blocks(second)
    bm.free_blocks(first)
    taker = Sequence(list(range(500, 532)), SamplingParams())  # takes all 8 window blocks
    bm.allocate(taker, 32)
    third = Sequence(list(range(100, 124)) + [7], SamplingParams())
    bm.reuse_cached_prefix(third)
    assert third.num_computed_tokens < 24  # the window blocks of the 6-block hit were reused


@pytest.mark.gpu
@pytest.mark.parametrize("compilation", ["graphs", "piecewise"])
def test_gemma3_on_the_gpu_matches_hf(gemma3_text, compilation):
    """The Triton kernels, async scheduling and CUDA graphs (the window group's tables among their
    inputs), eager or torch.compile'd, in float32, past the window: HF's tokens."""
    from test_gpu import gpu_config
    path, expected = gemma3_text
    ours, run = _greedy(gpu_config(path, compilation=compilation, max_num_batched_tokens=16), PROMPTS, 12)
    assert ours == expected
    assert run["ranks"][0]["kv_window_blocks"] > 0


def test_gemma3_samples_of_one_prompt_share_its_window_blocks(gemma3_text):
    """n > 1: the other samples take references to the prompt's full blocks and to the window
    blocks its last window reaches; every sample matches HF and all blocks come back."""
    from framework import SamplingParams
    path, expected = gemma3_text
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(_cfg(path)) as llm:
        engine, bm = llm.launcher.engine, llm.launcher.engine.block_manager
        seqs = engine.add_request_group({"prompt_token_ids": PROMPTS[0]}, [greedy] * 3)
        shared = None
        while engine.has_work():
            engine.step()
            if shared is None and all(s.block_table for s in seqs):
                shared = [s.window_block_table[:9] for s in seqs]  # 36 shared prompt tokens
        # the samples hold only the blocks the window after the 36 shared tokens reaches (7, 8)
        assert shared[1] == shared[2] == [-1] * 7 + shared[0][7:9]
        assert [engine.output(s).token_ids for s in seqs] == [expected[0]] * 3
        assert bm.num_free_blocks == bm.num_blocks and bm.num_free_window_blocks == bm.window.num_blocks


def test_window_pool_exhausted_by_a_direct_allocate_is_one_line():
    """The scheduler checks both pools before it allocates; a direct caller (task=eval's one-step
    windows) gets a line naming the window pool, not a StopIteration."""
    from framework import SamplingParams
    from framework.engine.block_manager import BlockManager
    from framework.engine.sequence import Sequence
    bm = BlockManager(16, 4, num_window_blocks=3, sliding_window=8)
    seq = Sequence(list(range(40)), SamplingParams())
    assert not bm.can_allocate(seq, 40)
    with pytest.raises(RuntimeError, match="sliding-window layers' KV pool has 3 free blocks; 40 new tokens"):
        bm.allocate(seq, 40)


@pytest.mark.slow
def test_gemma3_tp2_matches_hf(gemma3_text, ray_cluster):
    """Two gloo ranks: heads split, q/k norms and both KV pools per rank, the same window blocks."""
    path, expected = gemma3_text
    cfg = _cfg(path, max_model_len=128, max_num_seqs=4)
    cfg.parallelism.tensor_parallel_size = 2
    ours, run = _greedy(cfg, PROMPTS, 12)
    assert ours == expected
    assert [r["kv_window_blocks"] for r in run["ranks"]] == [run["ranks"][0]["kv_window_blocks"]] * 2
