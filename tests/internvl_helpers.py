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


def tiny_internvl_config(text_model_type: str = "qwen2"):
    """text_model_type: qwen2 (q/k/v biases), or llama (InternLM2's equivalent: no biases)."""
    from transformers import InternVLConfig
    tok = build_tokenizer()
    text = dict(TINY_TEXT, model_type=text_model_type, bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    return InternVLConfig(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=False,
                          image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                          image_seq_length=TOKENS_PER_TILE, architectures=["InternVLForConditionalGeneration"])


def build_tiny_internvl(path: Path, seed: int = 0, text_model_type: str = "qwen2") -> Path:
    """A random InternVL folder (weights in the names transformers saves) with its processor."""
    import torch
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(tiny_internvl_config(text_model_type)).eval()
    with torch.no_grad():  # HF starts norms at one, biases and the class token at zero: make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or "cls_token" in name or "position_embeddings" in name or "lambda" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    build_processor(path)
    return path


def write_internvl_chat_layout(native: Path, path: Path) -> Path:
    """The same model as `native` (a Llama decoder) in InternVL2's original layout: config.json of
    model_type internvl_chat (llm_config InternLM2, vision_config InternViT), InternLM2's fused
    wqkv grouped per KV head, InternViT's fused qkv, mlp1 projector; the processor files copied."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    config = json.loads((native / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert text["model_type"] == "llama", "InternLM2 maps onto a Llama decoder"
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text["hidden_size"] // heads
    llm_config = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=text["attention_bias"],
                      vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                      intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=text["max_position_embeddings"], rms_norm_eps=text["rms_norm_eps"],
                      rope_theta=text["rope_parameters"]["rope_theta"], rope_scaling={"type": "dynamic", "factor": 2.0},
                      hidden_act="silu", tie_word_embeddings=False, eos_token_id=text["eos_token_id"])
    vision_config = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b",
                         hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
                         num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
                         image_size=vision["image_size"][0], patch_size=vision["patch_size"][0],
                         qkv_bias=vision["attention_bias"], qk_normalization=vision["use_qk_norm"],
                         norm_type=vision["norm_type"], layer_norm_eps=vision["layer_norm_eps"], hidden_act="gelu")
    remote = dict(architectures=["InternVLChatModel"], model_type="internvl_chat",
                  auto_map={"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                            "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
                  downsample_ratio=config["downsample_ratio"], force_image_size=vision["image_size"][0],
                  ps_version="v2", select_layer=-1, template="internlm2-chat", dynamic_image_size=True,
                  max_dynamic_patch=12, min_dynamic_patch=1, use_thumbnail=True, llm_config=llm_config,
                  vision_config=vision_config, torch_dtype="float32")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(remote, indent=2))

    native_weights = load_file(str(native / "model.safetensors"))
    out, groups = {}, heads // kv_heads
    renames = [("language_model.model.embed_tokens.", "language_model.model.tok_embeddings."),
               ("language_model.lm_head.", "language_model.output."),
               ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
               ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
               ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
               ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
               (".attention.projection_layer.", ".attn.proj."), (".layernorm_before.", ".norm1."),
               (".layernorm_after.", ".norm2."), (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
               ("multi_modal_projector.layer_norm.", "mlp1.0."), ("multi_modal_projector.linear_1.", "mlp1.1."),
               ("multi_modal_projector.linear_2.", "mlp1.3."),
               (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
               (".mlp.up_proj.", ".feed_forward.w3."), (".mlp.down_proj.", ".feed_forward.w2."),
               (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm.")]
    fused_parts = tuple(f".{kind}.{p}_proj." for kind in ("self_attn", "attention") for p in "qkv")
    for name, tensor in native_weights.items():
        if any(part in name for part in fused_parts):
            continue  # fused below
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = tensor
    for name, q in native_weights.items():
        if ".self_attn.q_proj." in name:  # [kv head: its q heads, k, v] rows
            k, v = (native_weights[name.replace(".q_proj.", f".{p}.")] for p in ("k_proj", "v_proj"))
            rest = q.shape[1:]
            fused = torch.cat([q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest),
                               v.reshape(kv_heads, 1, head_dim, *rest)], dim=1)
            out[name.replace(".self_attn.q_proj.", ".attention.wqkv.")] = fused.reshape(-1, *rest).contiguous()
        if ".attention.q_proj." in name:  # InternViT: [q; k; v]
            k, v = (native_weights[name.replace(".q_proj.", f".{p}.")] for p in ("k_proj", "v_proj"))
            fused_name = name.replace(".attention.q_proj.", ".attn.qkv.").replace("vision_tower.encoder.layer.",
                                                                                 "vision_model.encoder.layers.")
            out[fused_name] = torch.cat([q, k, v]).contiguous()
    save_file(out, str(path / "model.safetensors"))
    for file in native.iterdir():  # tokenizer, processor and chat template: transformers' own files
        if file.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(file, path / file.name)
    return path



# OpenGVLab/InternVL2-2B's config.json as published (original layout; the values that matter here)
INTERNVL2_2B_CHAT_CONFIG = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
    "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12,
    "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": "internlm2-chat",
    "use_thumbnail": True, "torch_dtype": "bfloat16",
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                   "vocab_size": 92553, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-05, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                   "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                   "pad_token_id": 2},
    "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
                      "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "image_size": 448, "patch_size": 14, "qkv_bias": True, "qk_normalization": False,
                      "norm_type": "layer_norm", "layer_norm_eps": 1e-06, "hidden_act": "gelu", "num_channels": 3},
}
