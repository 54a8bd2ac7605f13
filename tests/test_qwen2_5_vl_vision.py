"""The vision tower against transformers' Qwen2_5_VisionTransformerPretrainedModel, same weights, fp32."""
from __future__ import annotations

import pytest
import torch

from framework.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer, vision_layout

# window_size 56 = 2 merge blocks a side, so small grids still hold several windows, some cut short
TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
                   patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                   fullatt_block_indexes=[1, 3], hidden_act="silu")


def _pair(seed: int = 0):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    torch.manual_seed(seed)
    config = Qwen2_5_VLVisionConfig(**TINY_VISION)
    config._attn_implementation = "sdpa"
    hf = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    with torch.no_grad():  # HF initialises norms at one and biases at zero: make every weight count
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = Qwen2_5_VisionTransformer(config)
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            loader = getattr(params[name], "weight_loader", None)
            loader(params[name], tensor) if loader else params[name].copy_(tensor)
    return hf, ours


def _compare(grids):
    hf, ours = _pair()
    patch_dim = 3 * 2 * 14 * 14
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), patch_dim)
    with torch.no_grad():
        want = hf(pixels, grid_thw=torch.tensor(grids)).pooler_output
        got = ours(pixels, grids)
    assert got.shape == (sum(t * h * w for t, h, w in grids) // 4, 24)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return ours, pixels


def test_one_image_matches_hf():
    _compare([(1, 10, 14)])  # 5 x 7 merge blocks: windows of 2 x 2, cut at the right and bottom edges


def test_two_images_of_different_sizes_match_hf():
    ours, pixels = _compare([(1, 8, 12), (1, 6, 4)])
    # items never attend to each other: the second alone gives its part of the batch
    with torch.no_grad():
        both = ours(pixels, [(1, 8, 12), (1, 6, 4)])
        alone = ours(pixels[96:], [(1, 6, 4)])
    torch.testing.assert_close(both[24:], alone, rtol=1e-5, atol=1e-5)


def test_video_with_temporal_patches_matches_hf():
    _compare([(3, 4, 6)])


def test_image_and_video_in_one_batch_match_hf():
    _compare([(1, 6, 8), (2, 4, 4)])


def test_layout_segments_cover_every_patch_once():
    ours = _pair()[1]
    layout = vision_layout([(2, 6, 10), (1, 4, 4)], ours.args)
    assert sorted(layout.patch_order.tolist()) == list(range(2 * 60 + 16))
    assert layout.frame_bounds == [0, 60, 120, 136]
    assert layout.window_bounds[-1] == 136 and all(b - a <= 16 for a, b in zip(layout.window_bounds, layout.window_bounds[1:]))


def test_wrong_pixel_shape_is_one_line():
    ours = _pair()[1]
    with pytest.raises(ValueError, match=r"pixel_values has shape \(10, 1176\); the grids \[\(1, 4, 4\)\] need \(16, 1176\)"):
        ours(torch.zeros(10, 1176), [(1, 4, 4)])
