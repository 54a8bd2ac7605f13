"""InternVL end to end on CPU: our engine against HF transformers, token for token (greedy)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from framework import SamplingParams
from framework.llm import LLM
from tests.helpers import small_config
from tests.internvl_helpers import TOKENS_PER_TILE, build_tiny_internvl
from tests.vl_helpers import random_image

# HF's InternVL image processor (GotOcr2) needs torchvision; the planner and rope tests do not
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="HF's InternVL image processor needs torchvision")

IMAGE = "<IMG_CONTEXT>\n"
MAX_TOKENS = 8


def chat_text(parts: str, question: str = "Describe.") -> str:
    return f"<|im_start|>user\n{parts}{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl"))


def vl_config(folder, limits=None, **cache):
    cfg = small_config(folder, **cache)
    cfg.multimodal.limit_mm_per_prompt = limits if limits is not None else {"image": 2}
    cfg.multimodal.mm_input_cache_gib = 0.01
    return cfg


def hf_greedy(folder, requests, max_tokens=MAX_TOKENS, **processor_kwargs):
    from transformers import AutoProcessor, InternVLForConditionalGeneration
    model = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    outs = []
    for req in requests:
        images = req.get("multi_modal_data", {}).get("image")
        images = None if images is None else images if isinstance(images, list) else [images]
        inputs = processor(text=[req["prompt"]], images=images, return_tensors="pt", **processor_kwargs)
        ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs


def ours(cfg, requests, max_tokens=MAX_TOKENS):
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return outs, llm.stats()["ranks"][0]


REQUESTS = {
    "one_image": {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(90, 130, seed=1)}},
    "two_images_of_different_sizes": {"prompt": chat_text(IMAGE + "and " + IMAGE, "Compare."),
                                      "multi_modal_data": {"image": [random_image(200, 60, seed=2),
                                                                     random_image(40, 40, seed=3)]}},
    "text_only": {"prompt": chat_text("", "Hello there, how are you?")},
}


@needs_torchvision
def test_hf_equality_one_image_two_images_and_text_in_one_batch(folder):
    requests = list(REQUESTS.values())
    outs, stats = ours(vl_config(folder), requests)
    assert [o.error for o in outs] == [None] * len(requests)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(folder, requests)
    assert stats["encoder_cache"]["misses"] == 3 and stats["vision_weight_bytes"] > 0
    # <img>, then the tiles' tokens (several tiles and a thumbnail for the 90x130 image), then </img>
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder)
    want = processor(text=[REQUESTS["one_image"]["prompt"]], images=[REQUESTS["one_image"]["multi_modal_data"]["image"]],
                     return_tensors="pt")["input_ids"][0].tolist()
    assert outs[0].prompt_token_ids == want
    assert want.count(processor.image_token_id) > TOKENS_PER_TILE  # more than one tile


@needs_torchvision
def test_max_dynamic_patch_maps_onto_max_patches(folder):
    """The seed's knob (vLLM's name) caps the tiles through the processor's max_patches, from the
    config and per request (which wins); outputs stay HF's under the same cap."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder)
    image = random_image(60, 200, seed=4)  # wide: 3 tiles + a thumbnail by default (max_patches=4)
    request = {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": image}}

    def hf_tokens(**kw):
        ids = processor(text=[request["prompt"]], images=[image], return_tensors="pt", **kw)["input_ids"][0]
        return int((ids == processor.image_token_id).sum())

    assert hf_tokens() == 4 * TOKENS_PER_TILE and hf_tokens(max_patches=2) == 3 * TOKENS_PER_TILE
    cfg = vl_config(folder)
    cfg.multimodal.mm_processor_kwargs = {"max_dynamic_patch": 1}
    outs, _ = ours(cfg, [request, dict(request, mm_processor_kwargs={"max_dynamic_patch": 2})])
    counts = [o.prompt_token_ids.count(processor.image_token_id) for o in outs]
    assert counts == [TOKENS_PER_TILE, 3 * TOKENS_PER_TILE]  # one tile has no thumbnail
    assert outs[0].outputs[0].token_ids == hf_greedy(folder, [request], max_patches=1)[0]
    assert outs[1].outputs[0].token_ids == hf_greedy(folder, [request], max_patches=2)[0]
    from framework.config.errors import ConfigError
    cfg.multimodal.mm_processor_kwargs = {"max_dynamic_patch": 0}
    with pytest.raises(ConfigError, match="multimodal.mm_processor_kwargs.max_dynamic_patch"):
        LLM(cfg)


@needs_torchvision
def test_text_only_holds_no_vision_weights(folder):
    from framework.models.internvl import InternVLForConditionalGeneration
    text = REQUESTS["text_only"]
    full, full_stats = ours(vl_config(folder), [text])
    cfg = vl_config(folder, limits={"image": 0})
    with LLM(cfg) as llm:
        model = llm.launcher.local_engine().runner.model
        assert isinstance(model, InternVLForConditionalGeneration) and model.vision_modules() == []
        assert not any(name.startswith(("vision_tower", "multi_modal_projector")) for name, _ in model.named_parameters())
        outs = llm.generate([text, REQUESTS["one_image"]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                       ignore_eos=True))
        stats = llm.stats()["ranks"][0]
    assert outs[0].outputs[0].token_ids == full[0].outputs[0].token_ids == hf_greedy(folder, [text])[0]
    assert outs[1].error is not None
    assert stats["vision_weight_bytes"] == 0
    assert full_stats["weight_bytes"] - stats["weight_bytes"] == full_stats["vision_weight_bytes"]
    assert stats["bytes_read"] < full_stats["bytes_read"]  # the tower's tensors are never read


def test_internvl2_2b_shape_plans_with_hf_weights_and_tiles():
    """The shipped InternVL2-2B shape: decoder and encoder weights equal HF's model (built on
    meta), an image's tokens follow max_dynamic_patch (256 a 448-pixel tile, + a thumbnail)."""
    from transformers import InternVLForConditionalGeneration as HF
    from framework.loader.resolve import load_hf_config, resolve_model_path
    from framework.memory.encoder import encoder_budget
    from framework.memory.planner import GiB, plan_memory
    from framework.memory.shape import vision_shape
    from tests.test_planner import plan_config
    hf_config = load_hf_config(resolve_model_path("internvl2-2b"))
    with torch.device("meta"):
        model = HF(hf_config)
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.vision_tower",
                                                                                 "model.multi_modal_projector")))
    text = sum(p.numel() for p in model.parameters()) - vision
    plan = plan_memory(plan_config("internvl2-2b", max_model_len=8192), hf_config, 80 * GiB)
    assert plan.weight_bytes == 2 * text
    v = vision_shape(hf_config)
    budget = encoder_budget(v, {"image": 1}, {}, 2048, 8192, 2)
    assert budget.weight_bytes == 2 * vision
    assert budget.item_tokens == {"image": 13 * 256}  # 12 tiles (the processor's default) + the thumbnail
    assert encoder_budget(v, {"image": 1}, {"max_dynamic_patch": 6}, 2048, 8192, 2).item_tokens == {"image": 7 * 256}
    assert encoder_budget(v, {"image": 1}, {"max_dynamic_patch": 1}, 512, 8192, 2).tokens == 512


@needs_torchvision
def test_internvl_chat_layout_loads_to_hf_outputs(tmp_path):
    """InternVL2's own layout (model_type internvl_chat, InternLM2 decoder with fused wqkv, InternViT
    with fused qkv, mlp1 projector), written by the test from a native InternVL with a Llama
    decoder: our engine on it gives HF's tokens on the native folder; text-only reads no tower."""
    from framework.models.internvl_chat import InternVLChatModel
    from tests.internvl_helpers import write_internvl_chat_layout
    native = build_tiny_internvl(tmp_path / "native", seed=7, text_model_type="llama")
    remote = write_internvl_chat_layout(native, tmp_path / "remote")
    requests = list(REQUESTS.values())
    want = hf_greedy(native, requests)
    with LLM(vl_config(remote)) as llm:
        assert isinstance(llm.launcher.local_engine().runner.model, InternVLChatModel)
        outs = llm.generate(requests, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        full = llm.stats()["ranks"][0]
    assert [o.outputs[0].token_ids for o in outs] == want
    text, stats = ours(vl_config(remote, limits={"image": 0}), [REQUESTS["text_only"]])
    assert text[0].outputs[0].token_ids == want[2]
    assert stats["vision_weight_bytes"] == 0 and stats["bytes_read"] < full["bytes_read"]


def test_dynamic_rope_is_hf_default_below_max_positions():
    """InternLM2's `dynamic` NTK rope (InternVL2-2B): HF's initial frequencies, the ones every
    position below max_position_embeddings (where the context is capped) uses."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from framework.layers.rotary import inverse_frequencies, rope_parameters
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu")
    ours_ = inverse_frequencies(16, rope_parameters(config))
    torch.testing.assert_close(ours_.float(), hf.float())


@needs_torchvision
def test_prefill_chunks_split_images_and_preemption_keeps_outputs(folder):
    """8-token steps cut every image's run of <IMG_CONTEXT> tokens (20 for the 90x130 image) across
    chunks; a KV cache of a few blocks preempts and recomputes requests."""
    requests = [REQUESTS["two_images_of_different_sizes"], REQUESTS["one_image"]]
    want = hf_greedy(folder, requests)
    outs, stats = ours(vl_config(folder, max_num_batched_tokens=8), requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["encoder_cache"]["budget_tokens"] == 5 * TOKENS_PER_TILE  # the folder's max_patches=4 + thumbnail
    outs, stats = ours(vl_config(folder, max_num_batched_tokens=8, num_gpu_blocks_override=12, max_model_len=96),
                       requests)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["num_preemptions"] > 0


@needs_torchvision
def test_bad_requests_fail_alone(folder):
    good = REQUESTS["one_image"]
    image = random_image(56, 56)
    bad = [
        {"prompt": chat_text(IMAGE * 3), "multi_modal_data": {"image": [image] * 3}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"video": [image, image]}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"max_dynamic": 2}},
        {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"max_dynamic_patch": 0}},
    ]
    outs, _ = ours(vl_config(folder), [good] + bad + [good])
    assert outs[0].error is None and outs[-1].outputs[0].token_ids == outs[0].outputs[0].token_ids
    for out, expected in zip(outs[1:-1], ["limit_mm_per_prompt.image=2", "takes no video input",
                                          "mm_processor_kwargs.max_dynamic=2", "max_dynamic_patch=0: must be an integer >= 1"]):
        assert out.error is not None and expected in out.error and "\n" not in out.error, (out.error, expected)


def test_internvl2_2b_original_config_maps_onto_the_shipped_shape():
    """The published InternVL2-2B config.json (internvl_chat) read natively describes the same model
    as the shipped shape (transformers' format): same decoder and tower, same planned bytes."""
    from framework.config.errors import UserError
    from framework.loader.resolve import load_hf_config, resolve_model_path
    from framework.memory.planner import GiB, plan_memory
    from framework.models.internvl_chat import native_config
    from tests.internvl_helpers import INTERNVL2_2B_CHAT_CONFIG
    from tests.test_planner import meta_model, param_bytes, plan_config
    mapped, shape = native_config(INTERNVL2_2B_CHAT_CONFIG), load_hf_config(resolve_model_path("internvl2-2b"))
    ours_, shipped = meta_model(mapped), meta_model(shape)
    assert param_bytes(ours_) == param_bytes(shipped)
    assert ours_.decoder_shape() == shipped.decoder_shape() and ours_.vision_args == shipped.vision_args
    assert ours_.args.rope == shipped.args.rope
    plans = [plan_memory(plan_config("internvl2-2b", max_model_len=8192), hf, 80 * GiB) for hf in (mapped, shape)]
    assert plans[0].weight_bytes == plans[1].weight_bytes and plans[0].encoder_bytes == plans[1].encoder_bytes > 0
    bad = {k: v for k, v in INTERNVL2_2B_CHAT_CONFIG.items() if k != "llm_config"}
    with pytest.raises(UserError, match="lacks the key 'llm_config'"):
        native_config(bad)


@needs_torchvision
def test_chat_with_image_parts_equals_hf(folder, tmp_path):
    """llm.chat: the folder's chat template writes <IMG_CONTEXT> for an image part; the tokens are
    HF's on the same rendered prompt."""
    image = random_image(90, 130, seed=1)
    path = tmp_path / "a.png"
    image.save(path)
    conversation = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                                 {"type": "text", "text": "Describe."}]}]
    with LLM(vl_config(folder)) as llm:
        out = llm.chat([conversation], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    assert out.error is None
    assert out.outputs[0].token_ids == hf_greedy(folder, [REQUESTS["one_image"]])[0]


def test_a_limit_for_a_modality_internvl_lacks_is_said_not_used():
    from framework import FrameworkConfig
    from framework.config.validate import inert_knobs
    from framework.loader.resolve import load_hf_config, resolve_model_path
    from framework.models.internvl import InternVLForConditionalGeneration
    cfg = FrameworkConfig()
    cfg.multimodal.limit_mm_per_prompt = {"image": 2, "video": 1}
    hf_config = load_hf_config(resolve_model_path("internvl2-2b"))
    notes = [note for _, note in inert_knobs(cfg, hf_config, True, True, InternVLForConditionalGeneration.modalities)]
    assert notes == ["multimodal.limit_mm_per_prompt.video=1: not used; InternVLForConditionalGeneration takes image "
                     "only (such a request fails alone)"]
    cfg.multimodal.limit_mm_per_prompt = {"image": 2, "video": 0}
    assert inert_knobs(cfg, hf_config, True, True, InternVLForConditionalGeneration.modalities) == []
