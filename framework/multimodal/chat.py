"""OpenAI-style chat messages with image and video parts -> messages for the model's chat template
plus the `multi_modal_data` the processor takes, items in the order they appear.

Accepted content parts: `{"type": "text", "text": ...}`; `{"type": "image_url", "image_url":
{"url": ...}}` (or the url as a plain string) where the url is a `data:` URL, a local path or
`file://`; `{"type": "image", "image": <PIL.Image | path | ...>}`; `{"type": "video", "video":
[frames]}`. The template sees `{"type": "image"}` / `{"type": "video"}` parts, which HF chat
templates (Qwen2-VL's among them) turn into the model's placeholders.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from framework.multimodal.limits import MultimodalInputError


def _url_of(part: Mapping[str, Any], key: str, where: str) -> Any:
    value = part.get(key)
    if isinstance(value, Mapping):
        value = value.get("url")
    if value is None:
        raise MultimodalInputError(f"{where}.{key} needs a url ({{\"{key}\": {{\"url\": ...}}}})")
    return value


def split_chat_messages(messages: Sequence[Mapping[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[str, List[Any]]]:
    """(messages for apply_chat_template, multi_modal_data)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MultimodalInputError("messages must be a non-empty list of {role, content} dicts")
    template: List[Dict[str, Any]] = []
    media: Dict[str, List[Any]] = {}
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise MultimodalInputError(f"messages[{m}] must be a dict with a role and content")
        content = message.get("content")
        if content is None or isinstance(content, str):
            template.append({"role": message["role"], "content": content or ""})
            continue
        if not isinstance(content, (list, tuple)):
            raise MultimodalInputError(f"messages[{m}].content must be a string or a list of parts")
        parts = []
        for p, part in enumerate(content):
            where = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind in ("image_url", "image"):
                media.setdefault("image", []).append(_url_of(part, "image_url", where) if kind == "image_url"
                                                     else part.get("image"))
                parts.append({"type": "image"})
            elif kind == "video":
                media.setdefault("video", []).append(part.get("video"))
                parts.append({"type": "video"})
            elif kind == "video_url":
                raise MultimodalInputError(f"{where}: video_url needs a video file decoder, which this engine "
                                           "lacks; pass the frames as {\"type\": \"video\", \"video\": [frames]}")
            else:
                raise MultimodalInputError(f"{where}.type={kind!r}: supported part types: text, image_url, "
                                           "image, video")
        template.append({"role": message["role"], "content": parts})
    return template, media
