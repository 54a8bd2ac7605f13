"""Images and videos as requests give them, turned into RGB PIL images, and their content hash.

An image is a PIL.Image, a local path, a `file://` URL, a `data:image/...;base64,` URL, raw
encoded bytes, or an HxWx3 uint8 array. A video is a list of such frames (or a TxHxWx3 array).
Network URLs are refused: this engine never fetches anything.

The hash covers the decoded pixels (not the file name), so the same picture given as a path or
as a data URL is one cache entry, and two different pictures never share one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from typing import Any, List, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from framework.multimodal.limits import MultimodalInputError

IMAGE_FORMS = "a PIL.Image, a path, a file:// or data: URL, encoded bytes or an HxWx3 uint8 array"


def _open_bytes(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as exc:  # PIL raises several types for a bad file
        raise MultimodalInputError(f"{where} could not be decoded as an image: {exc}") from None


def _from_string(text: str, where: str) -> Image.Image:
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise MultimodalInputError(f"{where} is a data URL without ';base64,' data")
        try:
            return _open_bytes(base64.b64decode(payload, validate=True), where)
        except binascii.Error as exc:
            raise MultimodalInputError(f"{where} has invalid base64 data: {exc}") from None
    if text.startswith(("http://", "https://")):
        raise MultimodalInputError(f"{where} is a network URL ({text[:60]}); images are never fetched: "
                                   "pass a local path, a file:// URL or a data: URL")
    path = unquote(urlparse(text).path) if text.startswith("file://") else text
    if not os.path.isfile(path):
        raise MultimodalInputError(f"{where}: no image file at {path}")
    with open(path, "rb") as f:
        return _open_bytes(f.read(), where)


def load_image(obj: Any, where: str = "image") -> Image.Image:
    """Any accepted image form -> an RGB PIL image; MultimodalInputError naming `where` otherwise."""
    if isinstance(obj, Image.Image):
        image = obj
    elif isinstance(obj, (str, os.PathLike)):
        image = _from_string(os.fspath(obj), where)
    elif isinstance(obj, (bytes, bytearray)):
        image = _open_bytes(bytes(obj), where)
    elif isinstance(obj, np.ndarray) and obj.ndim == 3 and obj.shape[-1] in (1, 3, 4) and obj.dtype == np.uint8:
        image = Image.fromarray(obj if obj.shape[-1] != 1 else obj[..., 0])
    else:
        raise MultimodalInputError(f"{where} is a {type(obj).__name__}, not an image ({IMAGE_FORMS})")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_video(obj: Any, where: str = "video") -> List[Image.Image]:
    """A list of frames (each an accepted image form) or a TxHxWx3 uint8 array -> RGB frames of one size."""
    if isinstance(obj, np.ndarray) and obj.ndim == 4:
        frames = [load_image(frame, f"{where} frame {i}") for i, frame in enumerate(obj)]
    elif isinstance(obj, (list, tuple)):
        frames = [load_image(frame, f"{where} frame {i}") for i, frame in enumerate(obj)]
    else:
        raise MultimodalInputError(f"{where} is a {type(obj).__name__}, not a video (a list of frames, each "
                                   f"{IMAGE_FORMS}, or a TxHxWx3 uint8 array)")
    if not frames:
        raise MultimodalInputError(f"{where} has no frames")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise MultimodalInputError(f"{where} has frames of different sizes: {sorted(sizes)}")
    return frames


def content_hash(modality: str, frames: Sequence[Image.Image], extra: str = "") -> str:
    """Hex digest of the decoded pixels of an item's frames (one for an image), plus `extra`
    (the processor kwargs), so an entry never outlives the settings it was processed with."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{modality}|{len(frames)}|{extra}".encode())
    for frame in frames:
        h.update(f"|{frame.mode}|{frame.size}|".encode())
        h.update(frame.tobytes())
    return h.hexdigest()
