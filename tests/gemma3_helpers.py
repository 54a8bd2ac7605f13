"""Tiny Gemma-3 pieces built offline: a byte-level tokenizer with Gemma-3's image tokens, the HF
Gemma3 processor around it (28-pixel images, 14-pixel patches pooled to 4 tokens), and a random
`Gemma3ForConditionalGeneration` folder whose decoder has sliding-window layers."""
from __future__ import annotations

from pathlib import Path

import framework  # noqa: F401  (makes torchvision importable before transformers looks for it)

IMAGE_SIZE = 28  # pixels a side
PATCH = 7  # 4x4 = 16 patches, pooled 2x2 -> 4 tokens
TOKENS_PER_IMAGE = 4
WINDOW = 8
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# Gemma-3's chat template, reduced to what the tests use: <start_of_image> per image part
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def build_tokenizer(merge_newlines: bool = False):
    """merge_newlines: also "\\n\\n" and "\\n\\n\\n" as tokens of their own, as Gemma's tokenizer has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}  # 256 byte tokens
    merges = []
    if merge_newlines:  # "\n" is the byte-level symbol "Ċ"
        vocab.update({"ĊĊ": len(vocab), "ĊĊĊ": len(vocab) + 1})
        merges = [("Ċ", "Ċ"), ("ĊĊ", "Ċ")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE})
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return fast


def build_processor(path: Path, merge_newlines: bool = False) -> Path:
    """Writes a Gemma-3 processor (tokenizer, image processor, chat template) to `path`."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                                tokenizer=build_tokenizer(merge_newlines), image_seq_length=TOKENS_PER_IMAGE,
                                chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    return path


TEXT = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=24,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}},
            final_logit_softcapping=30.0, initializer_range=0.05)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)


def tiny_gemma3_config():
    from transformers import Gemma3Config
    tok = build_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return Gemma3Config(text_config=dict(TEXT, **ids), vision_config=VISION, mm_tokens_per_image=TOKENS_PER_IMAGE,
                        initializer_range=0.05,
                        image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                        eoi_token_index=tok.eoi_token_id, architectures=["Gemma3ForConditionalGeneration"])


def build_tiny_gemma3(path: Path, seed: int = 0) -> Path:
    """A random Gemma-3 folder (weights in the names transformers saves) with its processor."""
    import torch
    from transformers import Gemma3ForConditionalGeneration
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_gemma3_config()).eval()
    with torch.no_grad():  # HF starts Gemma norms at 0 (scale 1), biases and the projection at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and "vision_tower" not in name:
                p.uniform_(-0.5, 0.5)
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "mm_input_projection" in name:  # strong enough that images change the tokens, not so
                p.copy_(0.1 * torch.randn_like(p))  # strong that they drown the text
    model.save_pretrained(path)
    build_processor(path)
    return path


def blocky_image(height: int, width: int, seed: int = 0):
    """A few large random colour blocks: distinct after the resize to 28 pixels (noise would
    average out to the same grey)."""
    import numpy as np
    from PIL import Image
    cells = np.random.RandomState(seed).randint(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.NEAREST)
