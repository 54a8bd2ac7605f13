"""Fuyu end to end on CPU: our engine against HF transformers, token for token (greedy).

Prompts are token ids written as HF's FuyuProcessor writes them, with one `|SPEAKER|` per image
where its run goes: the image's rows, then `<s>`, then the text ending in `<0x04>`."""
from __future__ import annotations

import pytest
import torch

from framework import SamplingParams
from framework.llm import LLM
from tests.fuyu_helpers import BOA, IMAGE, build_tiny_fuyu
from tests.helpers import small_config
from tests.vl_helpers import random_image

pytest.importorskip("torchvision", reason="HF's FuyuProcessor needs torchvision (a project dependency)")

MAX_TOKENS = 8
# 45x70 pixels: 2 rows of 3 patches (the 60x90 canvas); 25x40: 1 row of 2
IMAGES = [random_image(45, 70, seed=1), random_image(25, 40, seed=2)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_fuyu(tmp_path_factory.mktemp("tiny_fuyu"))


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoProcessor, FuyuForCausalLM
    return (FuyuForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(folder))


def requests_for(processor):
    """(our request, HF's input ids, HF's patches or None) of each case."""
    tok = processor.tokenizer
    image = tok.convert_tokens_to_ids(IMAGE)

    def hf_image(img):  # HF's own run (rows, newlines, <s>) and patches for one image
        out = processor(text=[""], images=[img], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        run = ids[:ids.index(tok.bos_token_id) + 1]
        return run, out["image_patches"]

    cases = {}
    text = tok("Describe the picture." + BOA)["input_ids"]
    run, patches = hf_image(IMAGES[0])
    one = processor(text=["Describe the picture."], images=[IMAGES[0]], return_tensors="pt")
    assert one["input_ids"][0].tolist() == run + text  # what we build the HF side from is HF's own prompt
    cases["one_image"] = ({"prompt_token_ids": [image] + text, "multi_modal_data": {"image": IMAGES[0]}},
                          run + text, patches)
    (run1, p1), (run2, p2) = hf_image(IMAGES[0]), hf_image(IMAGES[1])
    text = tok("Which is larger?" + BOA)["input_ids"]
    cases["two_images"] = ({"prompt_token_ids": [image, image] + text, "multi_modal_data": {"image": IMAGES}},
                           run1 + run2 + text, torch.cat([p1, p2]))
    text = tok("Hello there, how are you?")["input_ids"]
    cases["text_only"] = ({"prompt_token_ids": text}, text, None)
    return cases


def hf_greedy(hf, cases, max_tokens=MAX_TOKENS):
    model, _ = hf
    outs = []
    for _, ids, patches in cases:
        kwargs = {} if patches is None else {"image_patches": patches}
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
        outs.append(out[0, len(ids):].tolist())
    return outs


def fuyu_config(folder, limit=2, **cache):
    cfg = small_config(folder, **cache)
    cfg.multimodal.limit_mm_per_prompt = {"image": limit}
    return cfg


def ours(cfg, requests, max_tokens=MAX_TOKENS):
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return outs, llm.stats()["ranks"][0]


def test_hf_equality_one_image_two_images_and_text_only(folder, hf):
    cases = list(requests_for(hf[1]).values())
    outs, stats = ours(fuyu_config(folder), [req for req, _, _ in cases])
    assert [o.error for o in outs] == [None] * len(cases)
    assert [o.prompt_token_ids for o in outs] == [ids for _, ids, _ in cases]  # runs expanded as HF writes them
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, cases)
    assert stats["encoder_cache"]["misses"] == 2  # the first image repeats: encoded once
    assert stats["vision_weight_bytes"] == (2700 + 1) * 64 * 4


def test_prefill_chunk_boundary_inside_an_image_run(folder, hf):
    """5-token steps: the first image's 9-token run (3 patches, newline, 3 patches, newline, <s>)
    is cut after its 5th token, inside the second row of patches; the second image's run too."""
    cases = [requests_for(hf[1])[name] for name in ("two_images", "one_image")]
    with LLM(fuyu_config(folder, max_num_batched_tokens=5)) as llm:
        runner = llm.launcher.local_engine().runner
        spans, merge = [], runner._multimodal_embeds

        def recording(step, input_ids):  # (first run token, tokens) of each image part a step embeds
            spans.extend((first, count) for _, _, first, count in step.mm_spans)
            return merge(step, input_ids)
        runner._multimodal_embeds = recording
        outs = llm.generate([req for req, _, _ in cases], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                          ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, cases)
    assert (0, 5) in spans and (5, 4) in spans  # the 9-token run in two steps, cut after 5 tokens


def test_text_only_holds_no_patch_projection(folder, hf):
    from framework.models.fuyu import FuyuForCausalLM
    cases = requests_for(hf[1])
    cfg = fuyu_config(folder, limit=0)
    with LLM(cfg) as llm:
        engine = llm.launcher.local_engine()
        model = engine.runner.model
        assert isinstance(model, FuyuForCausalLM) and model.vision_embed_tokens is None
        assert not any(name.startswith("vision") for name, _ in model.named_parameters())
        assert engine.runner.load_stats.num_tensors == 36  # of 38: vision_embed_tokens.{weight,bias} unread
        outs = llm.generate([cases["text_only"][0], cases["one_image"][0]],
                            SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        stats = llm.stats()["ranks"][0]
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, [cases["text_only"]])[0]
    assert outs[1].error is not None and "\n" not in outs[1].error and "image" in outs[1].error
    assert stats["vision_weight_bytes"] == 0


def test_seed_example_context_and_batch(folder, hf, tmp_path, monkeypatch):
    """SEED: LLM(model="adept/fuyu-8b", max_model_len=2048, max_num_seqs=2), the hub id resolved
    from a local HF cache holding the tiny model."""
    import huggingface_hub.constants as hub
    from tests.test_vllm_compat import fake_hub_cache
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", {"adept/fuyu-8b": folder})))
    cases = list(requests_for(hf[1]).values())
    with LLM(model="adept/fuyu-8b", max_model_len=2048, max_num_seqs=2, dtype="float32") as llm:
        outs = llm.generate([req for req, _, _ in cases], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                          ignore_eos=True))
        cfg, engine = llm.config, llm.launcher.local_engine()
        assert engine.max_model_len == 2048 and engine.scheduler.max_num_seqs == 2
    assert cfg.cache.max_model_len == 2048 and cfg.cache.max_num_seqs == 2
    # vLLM's default limit is one image a prompt: the two-image request alone is refused
    assert "limit_mm_per_prompt.image=1" in outs[1].error and "\n" not in outs[1].error
    del outs[1], cases[1]
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, cases)


def test_fuyu_8b_shape_plans_with_the_published_parameter_count():
    """The shipped Fuyu-8B config.json: our model on `meta` has HF's 9.41B parameters; the plan
    counts the decoder as weights and the patch projection as the encoder, none of it text-only."""
    from framework.config.compose import compose
    from framework.loader.resolve import load_hf_config, resolve_model_path
    from framework.memory.planner import GiB, plan_memory
    from tests.test_planner import meta_model
    hf_config = load_hf_config(resolve_model_path("fuyu-8b"))
    model = meta_model(hf_config, max_model_len=2048)
    projection = 2700 * 4096 + 4096
    assert sum(p.numel() for p in model.parameters()) == 9_408_238_592  # "9.41B params"
    assert sum(p.numel() for p in model.vision_embed_tokens.parameters()) == projection
    cfg = compose(["model=fuyu_8b_shape", "cache.max_model_len=2048", "cache.max_num_seqs=2"])
    plan = plan_memory(cfg, hf_config, 80 * GiB)
    assert plan.weight_bytes == 2 * (9_408_238_592 - projection)
    assert plan.encoder_bytes >= 2 * projection and plan.fits
    text = plan_memory(compose(["model=fuyu_8b_shape", "multimodal=text_only", "cache.max_model_len=2048",
                                "cache.max_num_seqs=2"]), hf_config, 80 * GiB)
    assert text.encoder_bytes == 0 and text.weight_bytes == plan.weight_bytes


def test_text_prompt_gets_the_image_first_as_hf_processor_does(folder, hf):
    """A string prompt without |SPEAKER|: the image goes before the text, as HF's processor
    puts it (which also ends the text with <0x04>: a prompt writes it, nothing is appended)."""
    model, processor = hf
    inputs = processor(text=["What is shown?"], images=[IMAGES[0]], return_tensors="pt")
    request = {"prompt": "What is shown?" + BOA, "multi_modal_data": {"image": IMAGES[0]}}
    outs, _ = ours(fuyu_config(folder), [request])
    ids = inputs["input_ids"][0].tolist()
    assert outs[0].prompt_token_ids == ids
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, [(None, ids, inputs["image_patches"])])[0]


def test_bad_image_fails_alone(folder, hf):
    cases = requests_for(hf[1])
    good, _, _ = cases["one_image"]
    bad = [{**good, "multi_modal_data": {"image": b"not a png"}},
           {**good, "multi_modal_data": {"image": IMAGES * 2}}]  # 4 images for one placeholder, over the limit
    outs, _ = ours(fuyu_config(folder), [good] + bad + [good])
    assert outs[0].error is None and outs[-1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    for out, expected in zip(outs[1:3], ["could not be decoded as an image", "limit_mm_per_prompt.image=2"]):
        assert out.error is not None and expected in out.error and "\n" not in out.error, out.error


def test_size_kwarg_shrinks_the_canvas(folder, hf):
    """mm_processor_kwargs.size (the processor's canvas) reaches HF's processor: a 30x60 canvas
    scales the 45x70 image down to one row of 2 patches."""
    model, processor = hf
    size = {"height": 30, "width": 60}
    inputs = processor(text=["Small?"], images=[IMAGES[0]], return_tensors="pt", size=size)
    request = {"prompt": "Small?" + BOA, "multi_modal_data": {"image": IMAGES[0]}, "mm_processor_kwargs": {"size": size}}
    outs, _ = ours(fuyu_config(folder), [request])
    ids = inputs["input_ids"][0].tolist()
    assert outs[0].prompt_token_ids == ids and inputs["image_patches"].shape[0] == 2
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, [(None, ids, inputs["image_patches"])])[0]
