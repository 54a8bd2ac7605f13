"""Gemma-3 with images end to end on CPU: our engine against HF transformers, token for token
(greedy), on a tiny random model whose decoder has 8-token sliding windows and whose images are
4 tokens that attend to each other both ways."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from framework import SamplingParams
from framework.llm import LLM
from tests.gemma3_helpers import TOKENS_PER_IMAGE, WINDOW, blocky_image, build_tiny_gemma3
from tests.helpers import small_config

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="HF's Gemma3 image processor needs torchvision")
pytestmark = needs_torchvision

IMAGE = "<start_of_image>"
MAX_TOKENS = 8
WIDE = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16)  # crops of tiny images


def chat_text(parts: str, question: str = "What is in it?") -> str:
    return f"<bos><start_of_turn>user\n{parts}{question}<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


def vl_config(folder, limits=None, **cache):
    cfg = small_config(folder, **cache)
    cfg.cache.block_size = 4
    cfg.multimodal.limit_mm_per_prompt = limits if limits is not None else {"image": 2}
    cfg.multimodal.mm_input_cache_gib = 0.01
    return cfg


def hf_run(folder, requests, max_tokens=MAX_TOKENS, **processor_kwargs):
    """HF's greedy tokens and the log-probabilities of its first generated token."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration
    model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    tokens, first = [], []
    for req in requests:
        images = req.get("multi_modal_data", {}).get("image")
        images = None if images is None else images if isinstance(images, list) else [images]
        inputs = processor(text=[req["prompt"]], images=images, return_tensors="pt", add_special_tokens=False,
                           **processor_kwargs)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens.append(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        first.append(torch.log_softmax(out.logits[0][0].float(), -1))
    return tokens, first


def ours(cfg, requests, max_tokens=MAX_TOKENS):
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                     logprobs=5))
        return outs, llm.stats()["ranks"][0]


def assert_first_logprobs(out, hf_first):
    """The first token's top-5 log-probabilities equal HF's: the prompt's image tokens were
    computed with HF's mask (greedy tokens alone may not notice a causal image)."""
    for token, logprob in out.outputs[0].logprobs[0].top:
        # text-only prompts differ by ~4e-4 (float32 noise); a causal image moves them by ~3e-2
        assert abs(logprob - float(hf_first[token])) < 3e-3, (token, logprob, float(hf_first[token]))


# Every prompt is longer than the 8-token window; the two-image one has an image at its start.
REQUESTS = {
    "one_image": {"prompt": chat_text(f"Look {IMAGE} here. "), "multi_modal_data": {"image": blocky_image(90, 130, 1)}},
    "two_images": {"prompt": chat_text(f"{IMAGE} and {IMAGE}", "Compare."),
                   "multi_modal_data": {"image": [blocky_image(200, 60, 2), blocky_image(40, 40, 3)]}},
    "text_only": {"prompt": chat_text("", "Hello there, how are you?")},
}


def test_hf_equality_one_image_two_images_and_text_in_one_batch(folder):
    requests = list(REQUESTS.values())
    outs, stats = ours(vl_config(folder), requests)
    assert [o.error for o in outs] == [None] * 3
    want, first = hf_run(folder, requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    for out, hf_first in zip(outs, first):
        assert_first_logprobs(out, hf_first)
    assert stats["encoder_cache"]["misses"] == 3 and stats["vision_weight_bytes"] > 0
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder)
    req = REQUESTS["two_images"]
    hf_ids = processor(text=[req["prompt"]], images=req["multi_modal_data"]["image"], return_tensors="pt",
                       add_special_tokens=False)["input_ids"][0].tolist()
    assert outs[1].prompt_token_ids == hf_ids  # \n\n<start_of_image>, 4 image tokens, <end_of_image>\n\n each
    assert hf_ids.count(processor.tokenizer.image_token_id) == 2 * TOKENS_PER_IMAGE
    assert len(hf_ids) > 4 * WINDOW


def test_images_attend_both_ways_in_the_engine(folder, monkeypatch):
    """Without the causal limits (image tokens causal like text), the first token's
    log-probabilities leave HF's: the test above does check the bidirectional mask."""
    import framework.engine.step_input as step_input
    monkeypatch.setattr(step_input, "_causal_limits", lambda seq, start, end: list(range(start, end)))
    req = REQUESTS["one_image"]
    outs, _ = ours(vl_config(folder), [req], max_tokens=1)
    _, first = hf_run(folder, [req], max_tokens=1)
    with pytest.raises(AssertionError):
        assert_first_logprobs(outs[0], first[0])


def _spy_chunks(monkeypatch):
    """Records (sequence, chunk start, chunk length) of every chunk the scheduler cuts, and
    checks that none ends inside an image run."""
    from framework.engine import scheduler as sched
    chunks = []
    fit = sched.Scheduler._fit_runs

    def spy(seq, n):
        n = fit(seq, n)
        start = seq.num_computed_tokens
        chunks.append((seq, start, n))
        assert not any(a < start + n < b for a, b in seq.bidirectional_runs), "a chunk ends inside an image run"
        return n
    monkeypatch.setattr(sched.Scheduler, "_fit_runs", staticmethod(spy))
    return chunks


def test_prefill_chunks_never_split_an_image_run(folder, monkeypatch):
    """6-token steps would end inside image runs of 4; the scheduler ends such a chunk before the
    run instead, and the outputs stay HF's."""
    chunks = _spy_chunks(monkeypatch)
    requests = [REQUESTS["two_images"], REQUESTS["one_image"]]
    want, first = hf_run(folder, requests)
    outs, _ = ours(vl_config(folder, max_num_batched_tokens=6), requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    for out, hf_first in zip(outs, first):
        assert_first_logprobs(out, hf_first)
    assert any(0 < n < 6 and start + n < seq.num_prompt_tokens for seq, start, n in chunks)  # cut before a run


def test_a_prefix_hit_may_end_inside_an_image_run(folder, monkeypatch):
    """Prefix caching on 8-token blocks: the second request shares the first one's text and image
    and then differs, so its hit ends inside the image run (the cached half was computed seeing
    the whole image); the rest of the run is computed in its first chunk. Both are HF's."""
    chunks = _spy_chunks(monkeypatch)
    image = REQUESTS["one_image"]["multi_modal_data"]["image"]
    requests = [REQUESTS["one_image"],
                {"prompt": chat_text(f"Look {IMAGE} there. "), "multi_modal_data": {"image": image}}]
    want, first = hf_run(folder, requests)
    cfg = vl_config(folder, enable_prefix_caching=True, max_num_seqs=1)
    cfg.cache.block_size = 8
    outs, _ = ours(cfg, requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    for out, hf_first in zip(outs, first):
        assert_first_logprobs(out, hf_first)
    seq, start, _ = next(c for c in chunks if c[0].request_id == "1")
    assert any(a < start < b for a, b in seq.bidirectional_runs)


def test_a_budget_smaller_than_an_image_is_one_line(folder):
    from framework.config.errors import ConfigError
    with pytest.raises(ConfigError, match=r"cache.max_num_batched_tokens=3: must be >= 4: an image's 4 tokens"):
        LLM(vl_config(folder, max_num_batched_tokens=3))
    cfg = vl_config(folder, max_num_batched_tokens=3, limits={"image": 0})  # text only: no image to hold
    with LLM(cfg) as llm:
        assert llm.generate([REQUESTS["text_only"]], SamplingParams(max_tokens=2))[0].error is None


def test_preemption_keeps_outputs(folder):
    requests = [REQUESTS["two_images"], REQUESTS["one_image"]]
    want, _ = hf_run(folder, requests)
    outs, stats = ours(vl_config(folder, max_num_batched_tokens=8, num_gpu_blocks_override=24, max_model_len=96),
                       requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["num_preemptions"] > 0


def test_pan_and_scan_crops_are_image_runs_of_their_own(folder):
    """do_pan_and_scan (the processor's own kwarg names, from the config or per request): a wide
    image becomes the original and its crops, 4 tokens each, with the processor's text between;
    the prompt is HF's, the tokens HF's, and each crop's run attends to itself both ways."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder)
    image = blocky_image(40, 130, seed=4)
    request = {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": image}}
    hf_ids = processor(text=[request["prompt"]], images=[image], return_tensors="pt", add_special_tokens=False,
                       **WIDE)["input_ids"][0].tolist()
    crops = hf_ids.count(processor.tokenizer.image_token_id) // TOKENS_PER_IMAGE - 1
    assert crops == 3
    cfg = vl_config(folder, max_num_batched_tokens=128)
    cfg.multimodal.mm_processor_kwargs = dict(WIDE)
    plain = dict(request, mm_processor_kwargs={"do_pan_and_scan": False})
    with LLM(cfg) as llm:
        outs = llm.generate([request, plain], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                                             logprobs=5))
        engine = llm.launcher.local_engine()
        budget = engine.encoder_cache.budget_tokens
    assert outs[0].prompt_token_ids == hf_ids
    assert outs[1].prompt_token_ids.count(processor.tokenizer.image_token_id) == TOKENS_PER_IMAGE
    want, first = hf_run(folder, [request], **WIDE)
    assert outs[0].outputs[0].token_ids == want[0]
    assert_first_logprobs(outs[0], first[0])
    assert outs[1].outputs[0].token_ids == hf_run(folder, [request])[0][0]
    assert budget == 128  # max_num_batched_tokens: above the largest item the planner counts
    # the planner's largest item follows the crops: 4 images' tokens + the text between them
    from framework.loader.resolve import load_hf_config
    from framework.memory.encoder import item_tokens
    from framework.memory.shape import vision_shape
    v = vision_shape(load_hf_config(folder))
    assert item_tokens(v, "image", {}, 4096) == TOKENS_PER_IMAGE
    assert item_tokens(v, "image", {"do_pan_and_scan": True}, 4096) >= 5 * TOKENS_PER_IMAGE
    assert item_tokens(v, "image", {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 2}, 4096) >= 3 * 4


def test_bad_requests_fail_alone(folder):
    good = REQUESTS["one_image"]
    image = blocky_image(56, 56)
    bad = [
        {"prompt": chat_text(IMAGE * 3), "multi_modal_data": {"image": [image] * 3}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"video": [image, image]}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"pan_scan": True}},
        {"prompt": chat_text(IMAGE * 2), "multi_modal_data": {"image": image}},
    ]
    outs, _ = ours(vl_config(folder), [good] + bad + [good])
    assert outs[0].error is None and outs[-1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    for out, expected in zip(outs[1:-1], ["limit_mm_per_prompt.image=2", "takes no video input",
                                          "mm_processor_kwargs.pan_scan=True", "2 <start_of_image> placeholder(s)"]):
        assert out.error is not None and expected in out.error and "\n" not in out.error, (out.error, expected)


def test_text_only_holds_no_vision_weights(folder):
    from framework.models.gemma3_vision import Gemma3ForConditionalGeneration
    text = REQUESTS["text_only"]
    full, full_stats = ours(vl_config(folder), [text])
    with LLM(vl_config(folder, limits={"image": 0})) as llm:
        model = llm.launcher.local_engine().runner.model
        assert isinstance(model, Gemma3ForConditionalGeneration) and model.vision_modules() == []
        assert not any(name.startswith(("vision_tower", "multi_modal_projector"))
                       for name, _ in model.named_parameters())
        outs = llm.generate([text, REQUESTS["one_image"]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                         ignore_eos=True))
        stats = llm.stats()["ranks"][0]
    assert outs[0].outputs[0].token_ids == full[0].outputs[0].token_ids == hf_run(folder, [text])[0][0]
    assert outs[1].error is not None
    assert stats["vision_weight_bytes"] == 0
    assert full_stats["weight_bytes"] - stats["weight_bytes"] == full_stats["vision_weight_bytes"]
    assert stats["bytes_read"] < full_stats["bytes_read"]  # the tower's tensors are never read


def test_published_layout_loads(folder, tmp_path):
    """The published checkpoints keep the tower under vision_tower.vision_model.*: renamed as loaded."""
    import shutil
    from safetensors.torch import load_file, save_file
    for file in folder.iterdir():
        shutil.copy(file, tmp_path / file.name)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()},
              str(tmp_path / "model.safetensors"))
    req = REQUESTS["one_image"]
    outs, _ = ours(vl_config(tmp_path), [req])
    assert outs[0].outputs[0].token_ids == hf_run(folder, [req])[0][0]


def test_chat_with_an_image_part_equals_hf(folder):
    image = blocky_image(90, 130, 1)
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Look "},
                                                 {"type": "image", "image": image},
                                                 {"type": "text", "text": " here. What is in it?"}]}]
    with LLM(vl_config(folder)) as llm:
        out = llm.chat([conversation], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    assert out.error is None
    assert out.outputs[0].token_ids == hf_run(folder, [REQUESTS["one_image"]])[0][0]


def test_gemma3_27b_shape_plans_its_tower():
    """The shipped Gemma-3-27B shape: the encoder's weights equal HF's SigLIP tower and projector
    (built on meta); an image is 256 tokens, a pan-and-scan one up to 4 crops more; text-only
    plans no encoder."""
    import transformers as tf
    from framework.loader.resolve import load_hf_config, resolve_model_path
    from framework.memory.encoder import encoder_budget
    from framework.memory.planner import GiB, plan_memory
    from framework.memory.shape import vision_shape
    from tests.test_planner import plan_config
    hf_config = load_hf_config(resolve_model_path("gemma-3-27b"))
    with torch.device("meta"):
        model = tf.Gemma3ForConditionalGeneration(hf_config)
    vision = sum(p.numel() for n, p in model.named_parameters()
                 if "vision_tower" in n and ".head." not in n or "multi_modal_projector" in n)
    v = vision_shape(hf_config)
    budget = encoder_budget(v, {"image": 1}, {}, 2048, 32768, 2)
    assert budget.weight_bytes == 2 * vision
    assert budget.item_tokens == {"image": 256}
    crops = encoder_budget(v, {"image": 1}, {"do_pan_and_scan": True}, 512, 32768, 2)
    assert 5 * 256 < crops.item_tokens["image"] < 5 * 256 + 64 and crops.tokens == crops.item_tokens["image"]
    plan = plan_memory(plan_config("gemma-3-27b", max_model_len=32768), hf_config, 80 * GiB)
    assert plan.encoder_bytes >= 2 * vision
    cfg = plan_config("gemma-3-27b", max_model_len=32768)
    cfg.multimodal.limit_mm_per_prompt = {"image": 0}
    assert plan_memory(cfg, hf_config, 80 * GiB).encoder_bytes == 0


@pytest.mark.slow
def test_gemma3_images_through_the_triton_kernels(folder, monkeypatch):
    """The same model through the Triton kernels (the interpreter on a CPU machine): image runs
    in 6-token prefill chunks and windowed decode match HF."""
    monkeypatch.setenv("KERNELS_FORCE_TRITON", "1")
    requests = [REQUESTS["two_images"]]
    want, first = hf_run(folder, requests, max_tokens=3)
    outs, _ = ours(vl_config(folder, max_num_batched_tokens=6), requests, max_tokens=3)
    assert [o.outputs[0].token_ids for o in outs] == want
    for out, hf_first in zip(outs, first):
        assert_first_logprobs(out, hf_first)


def test_prompt_ids_equal_hf_where_written_text_merges_with_the_prompt(tmp_path):
    """Gemma-3's processor writes "\\n\\n" around an image and tokenizes the whole prompt: with a
    tokenizer that merges newlines (as Gemma's does) the template's "user\\n" and the written "\\n\\n"
    become one token. Our prompt ids equal the HF processor's, one image or two side by side."""
    from transformers import AutoProcessor

    from framework.multimodal.processor import MultimodalProcessor
    from tests.gemma3_helpers import build_processor
    folder = build_processor(tmp_path, merge_newlines=True)
    hf = AutoProcessor.from_pretrained(folder)
    ours = MultimodalProcessor(hf, limit_mm_per_prompt={"image": 2})
    triple = hf.tokenizer.convert_tokens_to_ids("ĊĊĊ")
    for parts, images in [("<start_of_image>", [blocky_image(28, 28, seed=1)]),
                          ("<start_of_image><start_of_image>", [blocky_image(28, 28, seed=1), blocky_image(30, 20, seed=2)]),
                          ("Look.\n<start_of_image>\nThen", [blocky_image(28, 28, seed=3)])]:
        prompt = chat_text(parts)
        want = hf(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
        got = ours.process(ours.tokenize(prompt), {"image": images})
        assert got.token_ids == want, parts
        assert triple in want  # the merge happened, so the case tests something
        soft = hf.tokenizer.convert_tokens_to_ids("<image_soft_token>")
        assert all(got.token_ids[p.offset:p.end] == [soft] * p.item.num_tokens for p in got.items)
