"""M-RoPE positions against transformers' Qwen2_5_VLModel.get_rope_index on the same prompts."""
from __future__ import annotations

import pytest
import torch

from framework.models.mrope import MropeItem, decode_positions, mrope_positions

IMAGE, VIDEO, START, END = 90, 91, 92, 93  # placeholder token ids of the tiny config
MERGE, TOKENS_PER_SECOND = 2, 2


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           spatial_merge_size=MERGE, tokens_per_second=TOKENS_PER_SECOND),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    return Qwen2_5_VLModel(config).eval()


def _prompt(parts):
    """parts: ints (text tokens) and ("image"|"video", (t, h, w), second_per_grid) items."""
    ids, items = [], []
    for part in parts:
        if isinstance(part, int):
            ids += [7 + len(ids) % 50] * part
            continue
        kind, grid, spg = part
        ids.append(START)
        items.append(MropeItem(len(ids), grid, kind == "video", spg))
        ids += [IMAGE if kind == "image" else VIDEO] * items[-1].num_tokens(MERGE)
        ids.append(END)
    return ids, items


def _hf(model, ids, items):
    input_ids = torch.tensor([ids])
    types = torch.tensor([[1 if i == IMAGE else 2 if i == VIDEO else 0 for i in ids]])
    images = [i.grid_thw for i in items if not i.is_video]
    videos = [i for i in items if i.is_video]
    pos, delta = model.get_rope_index(
        input_ids, mm_token_type_ids=types,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor([v.grid_thw for v in videos]) if videos else None,
        second_per_grid_ts=torch.tensor([v.second_per_grid for v in videos]) if videos else None)
    return pos[:, 0], int(delta)


CASES = {
    "one_image": [5, ("image", (1, 6, 8), 1.0), 4],
    "two_images_of_different_sizes": [3, ("image", (1, 4, 12), 1.0), 2, ("image", (1, 10, 4), 1.0), 6],
    "image_first": [("image", (1, 4, 4), 1.0), 3],
    "video": [4, ("video", (3, 4, 6), 1.0), 5],
    "video_half_second_patches": [2, ("video", (5, 4, 4), 0.5), 3],
    "video_long_clip": [2, ("video", (8, 2, 2), 1.0), 3],  # the time row outgrows height and width
    "image_and_video": [2, ("image", (1, 6, 4), 1.0), 3, ("video", (2, 4, 4), 1.0), 1],
}


@pytest.mark.parametrize("name", list(CASES))
def test_positions_and_delta_match_hf(hf_model, name):
    import transformers
    from packaging.version import Version
    if name == "video_half_second_patches" and Version(transformers.__version__) < Version("5.18"):
        pytest.skip("transformers 5.17 truncates a video's seconds per patch to an integer (5.18 on do not)")
    ids, items = _prompt(CASES[name])
    want, want_delta = _hf(hf_model, ids, items)
    got, delta = mrope_positions(len(ids), items, MERGE, TOKENS_PER_SECOND)
    assert torch.equal(got, want), name
    assert delta == want_delta


def test_text_only_is_plain_positions():
    got, delta = mrope_positions(7, [], MERGE, TOKENS_PER_SECOND)
    assert torch.equal(got, torch.arange(7).expand(3, 7)) and delta == 0


def test_decode_continues_from_the_prompt(hf_model):
    ids, items = _prompt(CASES["one_image"])
    prompt, delta = mrope_positions(len(ids), items, MERGE, TOKENS_PER_SECOND)
    assert delta < 0  # 12 image tokens span 4 positions
    nxt = decode_positions(len(ids), 3, delta)
    assert nxt[:, 0].tolist() == [int(prompt.max()) + 1] * 3
    assert nxt[0].tolist() == list(range(int(prompt.max()) + 1, int(prompt.max()) + 4))


def test_item_past_the_prompt_is_refused():
    with pytest.raises(ValueError, match="needs 12 placeholder tokens; the prompt has 10 tokens"):
        mrope_positions(10, [MropeItem(2, (1, 6, 8))], MERGE, TOKENS_PER_SECOND)
