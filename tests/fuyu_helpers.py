"""A tiny Fuyu built offline: a character tokenizer with Fuyu's special tokens, HF's FuyuProcessor
around it (a 60x90 canvas: at most 2 rows of 3 patches), and a random model folder."""
from __future__ import annotations

from pathlib import Path

import framework  # noqa: F401  (makes torchvision importable before transformers looks for it)

IMAGE, NEWLINE, BOA = "|SPEAKER|", "|NEWLINE|", "<0x04>"
CANVAS = {"height": 60, "width": 90}


def build_tokenizer():
    """Like Fuyu's own: a '▁' is prepended to the text and |SPEAKER| / |NEWLINE| are ordinary
    vocabulary entries, so text that starts with them gets a leading '▁' token (HF's processor
    drops it), while <s> and <0x04> are special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<unk>", "<s>", "|ENDOFTEXT|", "▁"] + [chr(c) for c in range(33, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for word in (IMAGE, NEWLINE):  # BPE builds each from its characters
        for k in range(2, len(word) + 1):
            merges.append((word[:k - 1], word[k - 1]))
            vocab.setdefault(word[:k], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "|ENDOFTEXT|", BOA)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="|ENDOFTEXT|", unk_token="<unk>")


def build_processor(path: Path) -> Path:
    from transformers import FuyuImageProcessor, FuyuProcessor
    FuyuProcessor(image_processor=FuyuImageProcessor(size=CANVAS), tokenizer=build_tokenizer()).save_pretrained(path)
    return path


def tiny_config():
    from transformers import FuyuConfig
    tok = build_tokenizer()
    # head_dim 16, rotary on 8 of them (partial_rotary_factor 0.5, as Fuyu-8B)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=None)
    return FuyuConfig(text_config=text, patch_size=30, num_channels=3, image_size=300,
                      image_token_id=tok.convert_tokens_to_ids(IMAGE), architectures=["FuyuForCausalLM"])


def build_tiny_fuyu(path: Path, seed: int = 0) -> Path:
    """A random Fuyu folder (weights in HF's checkpoint names) with its processor."""
    import torch
    from transformers import FuyuForCausalLM
    torch.manual_seed(seed)
    model = FuyuForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # HF starts norms at one and biases at zero: make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    build_processor(path)
    return path
