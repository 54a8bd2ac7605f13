"""Multimodal inputs through the model folder's own HF processor: prompts, limits, kwargs, the cache."""
from __future__ import annotations

import base64
import io

import pytest
import torch

from framework.config.errors import ConfigError
from framework.multimodal.cache import ProcessorCache
from framework.multimodal.limits import MultimodalInputError
from framework.multimodal.processor import MultimodalProcessor
from tests.vl_helpers import build_processor, random_image, random_video

pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>and "
          "<|vision_start|><|image_pad|><|vision_end|> then <|vision_start|><|video_pad|><|vision_end|>"
          "what changed?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_processor(tmp_path_factory.mktemp("qwen_vl_processor"))


@pytest.fixture(scope="module")
def hf_processor(folder):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(folder)


def make(folder, **kwargs) -> MultimodalProcessor:
    kwargs.setdefault("limit_mm_per_prompt", {"image": 3, "video": 1})
    return MultimodalProcessor.from_pretrained(str(folder), **kwargs)


def test_prompt_and_tensors_equal_hf_processor_on_the_whole_prompt(folder, hf_processor):
    images = [random_image(100, 150, seed=1), random_image(240, 60, seed=2)]
    video = random_video(4, 60, 80, seed=3)
    ours = make(folder).process(PROMPT, {"image": images, "video": video})
    want = hf_processor(text=[PROMPT], images=images, videos=[video], return_tensors="pt")
    assert ours.token_ids == want["input_ids"][0].tolist()
    kinds = [p.item.modality for p in ours.items]
    assert kinds == ["image", "image", "video"]
    # each item's run sits where HF's placeholder run is
    ids = torch.tensor(ours.token_ids)
    for placed in ours.items:
        run = ids[placed.offset:placed.end]
        assert run.numel() == placed.item.num_tokens and bool((run == run[0]).all())
    torch.testing.assert_close(torch.cat([p.item.data["pixel_values"] for p in ours.items[:2]]), want["pixel_values"])
    assert torch.equal(torch.cat([p.item.data["image_grid_thw"] for p in ours.items[:2]]), want["image_grid_thw"])
    torch.testing.assert_close(ours.items[2].item.data["pixel_values_videos"], want["pixel_values_videos"])
    assert torch.equal(ours.items[2].item.data["video_grid_thw"], want["video_grid_thw"])
    torch.testing.assert_close(ours.items[2].item.data["second_per_grid_ts"], want["second_per_grid_ts"])


def test_text_only_prompt_is_just_tokenized(folder, hf_processor):
    out = make(folder).process("just text", None)
    assert out.items == [] and out.token_ids == hf_processor(text=["just text"])["input_ids"][0]


def test_every_image_form_is_the_same_item(folder, tmp_path):
    image = random_image(90, 70, seed=4)
    path = tmp_path / "a.png"
    image.save(path)
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    import numpy as np
    proc = make(folder)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    hashes = {proc.process(prompt, {"image": form}).items[0].item.content_hash
              for form in (image, str(path), f"file://{path}", data_url, path.read_bytes(), np.asarray(image))}
    assert len(hashes) == 1


@pytest.mark.parametrize("form, message", [
    ("https://example.com/a.png", "is a network URL"),
    ("/no/such/file.png", "no image file at /no/such/file.png"),
    ("data:image/png;base64,!!!", "invalid base64"),
    (b"not an image", "could not be decoded as an image"),
    (3.5, "is a float, not an image"),
])
def test_bad_image_is_one_line_naming_the_item(folder, form, message):
    with pytest.raises(MultimodalInputError, match=message) as err:
        make(folder).process("<|vision_start|><|image_pad|><|vision_end|>", {"image": form})
    assert "multi_modal_data.image[0]" in str(err.value) and "\n" not in str(err.value)


def test_max_pixels_lowers_the_token_count_as_the_processor_computes(folder, hf_processor):
    image = random_image(300, 400, seed=5)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    full = make(folder).process(prompt, {"image": image}).items[0].item.num_tokens
    capped = make(folder, mm_processor_kwargs={"max_pixels": 28 * 28 * 16}).process(prompt, {"image": image})
    per_request = make(folder).process(prompt, {"image": image}, {"max_pixels": 28 * 28 * 16})
    want = hf_processor.image_processor.get_number_of_image_patches(300, 400, {"max_pixels": 28 * 28 * 16}) // 4
    assert full == hf_processor.image_processor.get_number_of_image_patches(300, 400, {}) // 4 == 54
    assert capped.items[0].item.num_tokens == per_request.items[0].item.num_tokens == want == 12
    assert len(capped.token_ids) == 3 + want - 1


def test_unknown_processor_kwarg_names_the_valid_ones(folder):
    with pytest.raises(ConfigError, match=r"multimodal.mm_processor_kwargs.max_pixel=.*valid keys: .*max_pixels"):
        make(folder, mm_processor_kwargs={"max_pixel": 100})
    with pytest.raises(MultimodalInputError, match=r"mm_processor_kwargs.bogus=1: unknown key .*min_pixels"):
        make(folder).process("<|vision_start|><|image_pad|><|vision_end|>", {"image": random_image(56, 56)},
                             {"bogus": 1})
    with pytest.raises(ConfigError, match="the processor refuses them"):
        make(folder, mm_processor_kwargs={"max_pixels": "many"})


def test_limits_in_both_forms(folder):
    prompt = "<|vision_start|><|image_pad|><|vision_end|>" * 3
    images = [random_image(56, 56, seed=i) for i in range(3)]
    assert len(make(folder, limit_mm_per_prompt={"image": 3}).process(prompt, {"image": images}).items) == 3
    assert len(make(folder, limit_mm_per_prompt={"image": {"count": 3, "width": 512, "height": 512}})
               .process(prompt, {"image": images}).items) == 3
    with pytest.raises(MultimodalInputError, match=r"3 image item\(s\); multimodal.limit_mm_per_prompt.image=2$"):
        make(folder, limit_mm_per_prompt={"image": {"count": 2}}).process(prompt, {"image": images})
    with pytest.raises(MultimodalInputError, match=r"limit_mm_per_prompt.image=1 \(the default"):
        make(folder, limit_mm_per_prompt={}).process(prompt, {"image": images})
    with pytest.raises(MultimodalInputError, match="limit_mm_per_prompt.video=0"):
        make(folder, limit_mm_per_prompt={"video": 0}).process("<|video_pad|>", {"video": random_video(2, 56, 56)})
    lm_only = make(folder, language_model_only=True)
    assert lm_only.text_only and make(folder, limit_mm_per_prompt={"image": 0, "video": 0}).text_only
    with pytest.raises(MultimodalInputError, match="language_model_only=true"):
        lm_only.process(prompt, {"image": images})


def test_modality_the_model_lacks_and_placeholder_mismatches(folder):
    proc = make(folder)
    with pytest.raises(MultimodalInputError, match="this model takes no audio input; it takes: image, video"):
        proc.process("hi", {"audio": [b"..."]})
    with pytest.raises(MultimodalInputError, match="unknown modality"):
        proc.process("hi", {"smell": 1})
    with pytest.raises(MultimodalInputError, match=r"1 <\|image_pad\|> placeholder\(s\) for 2 image item"):
        proc.process("<|image_pad|>", {"image": [random_image(56, 56), random_image(56, 56, 1)]})
    with pytest.raises(MultimodalInputError, match="multi_modal_data has no image"):
        proc.process("<|image_pad|>", {})


def test_same_placeholders_different_images_differ(folder):
    proc = make(folder)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>describe"
    a = proc.process(prompt, {"image": random_image(84, 84, seed=1)})
    b = proc.process(prompt, {"image": random_image(84, 84, seed=2)})
    assert a.token_ids == b.token_ids
    assert a.items[0].item.content_hash != b.items[0].item.content_hash
    assert not torch.equal(a.items[0].item.data["pixel_values"], b.items[0].item.data["pixel_values"])


def test_cache_hits_repeats_and_keys_on_kwargs(folder):
    cache = ProcessorCache.from_gib(0.01)
    proc = make(folder, cache=cache)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    image = random_image(100, 100, seed=7)
    first = proc.process(prompt, {"image": image}).items[0].item
    again = proc.process(prompt, {"image": image.copy()}).items[0].item
    assert again is first and (cache.stats.hits, cache.stats.misses) == (1, 1)
    other = proc.process(prompt, {"image": image}, {"max_pixels": 28 * 28 * 4}).items[0].item
    assert other is not first and cache.stats.misses == 2 and cache.stats.bytes == first.nbytes + other.nbytes


def test_cache_is_lru_and_bounded_in_bytes(folder):
    proc = make(folder)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    items = [proc.process(prompt, {"image": random_image(56, 56, seed=i)}).items[0].item for i in range(4)]
    size = items[0].nbytes
    cache = ProcessorCache(3 * size)
    for item in items[:3]:
        cache.put(item.content_hash, item)
    assert cache.get(items[0].content_hash) is items[0]  # 0 is now the most recent: 1 goes first
    cache.put(items[3].content_hash, items[3])
    assert cache.keys() == [items[2].content_hash, items[0].content_hash, items[3].content_hash]
    assert cache.stats.bytes == 3 * size <= cache.capacity_bytes and cache.stats.evictions == 1
    tiny = ProcessorCache(size - 1)
    tiny.put(items[0].content_hash, items[0])
    assert tiny.keys() == [] and tiny.stats.too_large == 1
    off = ProcessorCache(0)
    off.put(items[0].content_hash, items[0])
    assert off.keys() == [] and off.get(items[0].content_hash) is None


def test_chat_template_writes_the_placeholders(folder, hf_processor):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "What is this?"}]}]
    text = hf_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = make(folder).process(text, {"image": random_image(56, 56)})
    assert len(out.items) == 1 and out.items[0].item.num_tokens == 4
