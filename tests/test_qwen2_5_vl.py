"""Qwen2.5-VL end to end on CPU: our engine against HF transformers, token for token (greedy)."""
from __future__ import annotations

import pytest
import torch

from framework import SamplingParams
from framework.llm import LLM
from tests.helpers import small_config
from tests.vl_helpers import build_tiny_qwen2_5_vl, random_image, random_video

pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
MAX_TOKENS = 8


def chat_text(parts: str, question: str = "Describe.") -> str:
    return f"<|im_start|>user\n{parts}{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


def vl_config(folder, limits=None, **cache):
    cfg = small_config(folder, **cache)
    cfg.multimodal.limit_mm_per_prompt = limits if limits is not None else {"image": 2, "video": 1}
    cfg.multimodal.mm_input_cache_gib = 0.01
    return cfg


def hf_greedy(folder, requests, max_tokens=MAX_TOKENS):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    outs = []
    for req in requests:
        data = req.get("multi_modal_data", {})
        images = data.get("image")
        images = None if images is None else images if isinstance(images, list) else [images]
        videos = [data["video"]] if "video" in data else None
        inputs = processor(text=[req["prompt"]], images=images, videos=videos, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return outs


def ours(cfg, requests, max_tokens=MAX_TOKENS):
    with LLM(cfg) as llm:
        outs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return outs, llm.stats()["ranks"][0]


REQUESTS = {
    "one_image": {"prompt": chat_text(IMAGE), "multi_modal_data": {"image": random_image(90, 130, seed=1)}},
    "two_images_of_different_sizes": {"prompt": chat_text(IMAGE + "and" + IMAGE, "Compare."),
                                      "multi_modal_data": {"image": [random_image(200, 60, seed=2),
                                                                     random_image(84, 84, seed=3)]}},
    "video": {"prompt": chat_text(VIDEO), "multi_modal_data": {"video": random_video(4, 56, 84, seed=4)}},
    "text_only": {"prompt": chat_text("", "Hello there, how are you?")},
}


def test_hf_equality_all_cases_in_one_batch(folder):
    requests = list(REQUESTS.values())
    outs, stats = ours(vl_config(folder), requests)
    assert [o.error for o in outs] == [None] * len(requests)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(folder, requests)
    assert stats["encoder_cache"]["misses"] == 4 and stats["vision_weight_bytes"] > 0
