"""The multimodal.* keys: both forms of limit_mm_per_prompt, the processor-cache names, language_model_only."""
from __future__ import annotations

import pytest

from framework.config.compose import compose
from framework.config.errors import ConfigError
from framework.loader.resolve import load_hf_config, resolve_model_path
from framework.memory.planner import GiB, plan_memory
from framework.multimodal.limits import ModalityLimit, parse_limits


def _qwen_vl_shape():
    return load_hf_config(resolve_model_path("qwen2.5-vl-3b"))


def test_both_limit_forms_compose_and_parse():
    cfg = compose(["++multimodal.limit_mm_per_prompt={image: {count: 3, width: 1024, height: 1024}, video: 1}"])
    limits = parse_limits(cfg.multimodal.limit_mm_per_prompt, modalities=("image", "video"))
    assert limits == {"image": ModalityLimit(3, 1024, 1024), "video": ModalityLimit(1)}
    assert parse_limits({}, modalities=("image",))["image"].count == 1
    assert parse_limits({"image": 4}, language_model_only=True, modalities=("image", "video")) == \
        {"image": ModalityLimit(0), "video": ModalityLimit(0)}


@pytest.mark.parametrize("override, key, expected", [
    ("++multimodal.limit_mm_per_prompt={image: {count: 3, widht: 5}}", "multimodal.limit_mm_per_prompt.image.widht",
     "valid keys: count, width, height, num_frames"),
    ("++multimodal.limit_mm_per_prompt={image: {width: 5}}", "multimodal.limit_mm_per_prompt.image.count", "required"),
    ("++multimodal.limit_mm_per_prompt={image: {count: 2, height: 0}}", "multimodal.limit_mm_per_prompt.image.height",
     "positive integer"),
    ("++multimodal.limit_mm_per_prompt={image: {count: -2}}", "multimodal.limit_mm_per_prompt.image.count", ">= 0"),
    ("multimodal.mm_processor_cache_gib=-1", "multimodal.mm_processor_cache_gib", ">= 0 GiB"),
])
def test_bad_values_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert err.value.key == key and expected in str(err.value)


def test_processor_cache_names(monkeypatch):
    monkeypatch.setenv("VLLM_MM_INPUT_CACHE_GIB", "0.5")
    assert compose().multimodal.processor_cache_gib == 0.5  # the seed's env var
    assert compose(["multimodal.mm_input_cache_gib=2"]).multimodal.processor_cache_gib == 2  # the seed's key
    assert compose(["multimodal.mm_processor_cache_gib=3"]).multimodal.processor_cache_gib == 3  # vLLM's, wins
    assert compose(["multimodal=text_only"]).multimodal.processor_cache_gib == 0


def test_planner_reads_the_dict_form_the_new_cache_name_and_language_model_only():
    hf = _qwen_vl_shape()
    base = ["model=qwen2_5_vl_3b_shape", "cache.max_model_len=8192", "+multimodal.mm_processor_kwargs.max_pixels=589824"]
    plain = plan_memory(compose(base + ["++multimodal.limit_mm_per_prompt={image: 2, video: 0}"]), hf, 80 * GiB)
    dict_form = plan_memory(compose(base + ["++multimodal.limit_mm_per_prompt={image: {count: 2}, video: 0}",
                                            "multimodal.mm_processor_cache_gib=1.5"]), hf, 80 * GiB)
    assert dict_form.encoder_bytes == plain.encoder_bytes > 0
    assert dict_form.host_cache_bytes == int(1.5 * GiB)
    lm_only = plan_memory(compose(base + ["multimodal.language_model_only=true"]), hf, 80 * GiB)
    assert lm_only.encoder_bytes == 0 and lm_only.host_cache_bytes == 0


def test_planner_suggests_pixel_caps_and_no_video_each_re_planned():
    from framework.memory.fixes import suggest_fixes
    hf = _qwen_vl_shape()
    # the hub's pixel cap: an image of 16384 tokens dominates the encoder's budget
    base = ["model=qwen2_5_vl_3b_shape", "cache.max_model_len=32768", "+multimodal.mm_processor_kwargs.max_pixels=12845056",
            "++multimodal.limit_mm_per_prompt={image: 2, video: 0}"]
    cfg = compose(base)
    plan = plan_memory(cfg, hf, 11 * GiB)
    assert not plan.fits
    fixes = {" ".join(f.overrides): f for f in suggest_fixes(cfg, hf, 11 * GiB, plan)}
    capped = fixes["++multimodal.mm_processor_kwargs.max_pixels=1048576"]
    assert capped.plan.fits and capped.plan.encoder_bytes < plan.encoder_bytes
    assert plan_memory(compose(base + ["++multimodal.mm_processor_kwargs.max_pixels=1048576"]), hf,
                       11 * GiB).encoder_bytes == capped.plan.encoder_bytes


def test_dict_form_sizes_bound_the_profiled_item():
    hf = _qwen_vl_shape()
    base = ["model=qwen2_5_vl_3b_shape", "cache.max_model_len=32768", "cache.max_num_batched_tokens=256"]
    full = plan_memory(compose(base + ["++multimodal.limit_mm_per_prompt={image: 2, video: 0}"]), hf, 80 * GiB)
    small = plan_memory(compose(base + ["++multimodal.limit_mm_per_prompt={image: {count: 2, width: 560, height: 280}, "
                                        "video: 0}"]), hf, 80 * GiB)
    assert "image 1280 tokens" in full.details["multimodal encoder"]
    assert "image 200 tokens" in small.details["multimodal encoder"]  # (560 / 28) x (280 / 28)
    assert small.encoder_bytes < full.encoder_bytes
