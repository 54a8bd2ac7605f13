"""OpenAI-style chat content parts -> template messages + multi_modal_data, and through the processor."""
from __future__ import annotations

import base64
import io

import pytest

from framework.multimodal.chat import split_chat_messages
from framework.multimodal.limits import MultimodalInputError
from tests.vl_helpers import build_processor, random_image, random_video


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_parts_become_template_parts_and_items_in_order(tmp_path):
    path = tmp_path / "b.png"
    random_image(30, 40, seed=2).save(path)
    frames = random_video(2, 28, 28)
    url = _data_url(random_image(20, 20))
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "and"},
                    {"type": "image_url", "image_url": f"file://{path}"},
                    {"type": "video", "video": frames}]}]
    template, media = split_chat_messages(messages)
    assert template[0] == {"role": "system", "content": "be brief"}
    assert [p["type"] for p in template[1]["content"]] == ["image", "text", "image", "video"]
    assert media == {"image": [url, f"file://{path}"], "video": [frames]}


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"content": "x"}], r"messages\[0\] must be a dict with a role"),
    ([{"role": "user", "content": [{"type": "audio_url"}]}], r"messages\[0\].content\[0\].type='audio_url'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"content\[0\].image_url needs a url"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4"}}]}], "video file decoder"),
])
def test_bad_messages_are_one_line(messages, message):
    with pytest.raises(MultimodalInputError, match=message):
        split_chat_messages(messages)


def test_chat_through_the_model_processor(tmp_path):
    pytest.importorskip("torchvision", reason="HF's Qwen2-VL processors need torchvision (a project dependency)")
    from transformers import AutoProcessor

    from framework.multimodal.processor import MultimodalProcessor
    folder = build_processor(tmp_path / "proc")
    image = random_image(56, 84, seed=3)
    template, media = split_chat_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": "what?"}]}])
    hf = AutoProcessor.from_pretrained(folder)
    text = hf.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    out = MultimodalProcessor(hf).process(text, media)
    want = hf(text=[text], images=[image], return_tensors="pt")
    assert out.token_ids == want["input_ids"][0].tolist() and out.items[0].item.num_tokens == 6
