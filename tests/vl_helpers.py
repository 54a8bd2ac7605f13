"""Tiny Qwen2.5-VL pieces built offline: a byte-level tokenizer with Qwen's special tokens, the
HF processor around it, and (for model tests) a random model folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import framework  # noqa: F401  (makes torchvision importable before transformers looks for it)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, reduced to what the tests use: one placeholder per image or video part
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# images up to 64 tokens (8x8 merged blocks), videos up to 16 a temporal patch
IMAGE_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
VIDEO_PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}  # 256 byte tokens, no merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return fast


def build_processor(path: Path) -> Path:
    """Writes a Qwen2.5-VL processor (tokenizer, image and video processors, chat template) to `path`."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**IMAGE_PIXELS),
                                    tokenizer=build_tokenizer(),
                                    video_processor=Qwen2VLVideoProcessor(**VIDEO_PIXELS),
                                    chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(frames: int, height: int, width: int, seed: int = 0):
    return [random_image(height, width, seed * 1000 + i) for i in range(frames)]


# A tiny Qwen2.5-VL: 2 decoder layers, a 2-block tower with one window and one full block.
# mrope_section adds up to head_dim / 2 = 8; token ids follow build_tokenizer's specials.
TINY_TEXT = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1],
                   tokens_per_second=2)


def tiny_vl_config():
    from transformers import Qwen2_5_VLConfig
    tok = build_tokenizer()
    ids = dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                   tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])))
    text = dict(TINY_TEXT, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen2_5_VLConfig(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=False,
                            architectures=["Qwen2_5_VLForConditionalGeneration"], **ids)


def build_tiny_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    """A random Qwen2.5-VL folder (weights in HF's checkpoint names) with its processor."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_vl_config()).eval()
    with torch.no_grad():  # HF starts norms at one and biases at zero: make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    build_processor(path)
    return path
