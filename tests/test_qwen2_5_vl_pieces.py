"""Our processor prompt, vision tower and M-RoPE positions, fed to HF's own decoder, give HF's
whole-model logits: the pieces the engine assembles are exactly what Qwen2.5-VL needs."""
from __future__ import annotations

import pytest
import torch

from framework.models.mrope import MropeItem, mrope_positions
from framework.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer
from framework.multimodal.processor import MultimodalProcessor
from tests.vl_helpers import TINY_VISION, build_tiny_qwen2_5_vl, random_image, random_video

pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.mark.parametrize("kinds", [("image",), ("image", "image"), ("video",), ()])
def test_pieces_reproduce_hf_logits(folder, kinds):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    images = [random_image(90, 130, seed=1), random_image(200, 60, seed=2)][:kinds.count("image")]
    videos = [random_video(4, 56, 84, seed=3)][:kinds.count("video")]
    parts = "".join("<|vision_start|><|image_pad|><|vision_end|>" if k == "image" else
                    "<|vision_start|><|video_pad|><|vision_end|>" for k in kinds)
    prompt = f"<|im_start|>user\n{parts}Describe.<|im_end|>\n<|im_start|>assistant\n"
    data = {k: v for k, v in (("image", images), ("video", videos)) if v}
    ours = MultimodalProcessor(processor, limit_mm_per_prompt={"image": 2, "video": 1}).process(prompt, data)

    # HF end to end
    inputs = processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt")
    with torch.no_grad():
        want = hf(**inputs).logits[0]

    # ours: tower on each item, merged into HF's token embeddings at the placeholder runs, our positions
    tower = Qwen2_5_VisionTransformer(hf.config.vision_config)
    params = dict(tower.named_parameters())
    with torch.no_grad():
        for name, tensor in hf.model.visual.state_dict().items():
            loader = getattr(params[name], "weight_loader", None)
            loader(params[name], tensor) if loader else params[name].copy_(tensor)
        ids = torch.tensor([ours.token_ids])
        embeds = hf.model.get_input_embeddings()(ids)[0]
        items = []
        for placed in ours.items:
            d = placed.item.data
            video = placed.item.modality == "video"
            grid = tuple(d["video_grid_thw" if video else "image_grid_thw"][0].tolist())
            embeds[placed.offset:placed.end] = tower(d["pixel_values_videos" if video else "pixel_values"], [grid])
            items.append(MropeItem(placed.offset, grid, video, float(d["second_per_grid_ts"][0]) if video else 1.0))
        positions, _ = mrope_positions(len(ours.token_ids), items, TINY_VISION["spatial_merge_size"],
                                       TINY_VISION["tokens_per_second"])
        hidden = hf.model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None]).last_hidden_state
        got = hf.lm_head(hidden)[0]
    assert ours.token_ids == inputs["input_ids"][0].tolist()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
