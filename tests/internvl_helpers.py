"""Tiny InternVL pieces built offline: a byte-level tokenizer with InternVL's special tokens, the
HF InternVL processor around it (GotOcr2 image processor: tiles of 56x56 pixels), and a random
`InternVLForConditionalGeneration` folder with a Qwen2 decoder."""
from __future__ import annotations

from pathlib import Path

import framework  # noqa: F401  (makes torchvision importable before transformers looks for it)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# InternVL's chat template, reduced to what the tests use: one <IMG_CONTEXT> per image part
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TILE = 56  # pixels a side of one tile: (56 / 14)^2 = 16 patches, 4 tokens after the pixel shuffle
TOKENS_PER_TILE = 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}  # 256 byte tokens, no merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                         "context_image_token": "<IMG_CONTEXT>",
                                                         "video_token": "<video>"})
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return fast


def build_processor(path: Path, max_patches: int = 4) -> Path:
    """Writes an InternVL processor (tokenizer, image and video processors, chat template) to `path`."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_got_ocr2_fast import GotOcr2ImageProcessorFast
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
    size = {"height": TILE, "width": TILE}
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessorFast(size=size, max_patches=max_patches,
                                                                           crop_to_patches=True),
                                  tokenizer=build_tokenizer(), video_processor=InternVLVideoProcessor(size=size),
                                  image_seq_length=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path


TINY_TEXT = dict(model_type="qwen2", vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                   image_size=[TILE, TILE], patch_size=[14, 14], layer_scale_init_value=0.5)


def tiny_internvl_config():
    from transformers import InternVLConfig
    tok = build_tokenizer()
    text = dict(TINY_TEXT, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return InternVLConfig(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=False,
                          image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                          image_seq_length=TOKENS_PER_TILE, architectures=["InternVLForConditionalGeneration"])


def build_tiny_internvl(path: Path, seed: int = 0) -> Path:
    """A random InternVL folder (weights in the names transformers saves) with its processor."""
    import torch
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(tiny_internvl_config()).eval()
    with torch.no_grad():  # HF starts norms at one, biases and the class token at zero: make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or "cls_token" in name or "position_embeddings" in name or "lambda" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    build_processor(path)
    return path
