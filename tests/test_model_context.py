"""The model context and interface: per-layer quantization, M-RoPE positions, one clear line for
an architecture we do not run."""
from __future__ import annotations

import json

import pytest
import torch

from framework import FrameworkConfig
from framework.config.errors import UserError
from framework.layers.quantization import QuantResolver
from framework.layers.rotary import RotaryEmbedding, rope_parameters
from framework.llm import LLM


def test_unsupported_architecture_is_one_line_naming_it(tmp_path):
    import transformers as tf
    config = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    config.save_pretrained(tmp_path)  # no `architectures`: named by its model_type
    cfg = FrameworkConfig()
    cfg.model.path = str(tmp_path)
    with pytest.raises(UserError, match=r"model_type 'gpt2' is not supported; supported: LlamaForCausalLM"):
        LLM(cfg)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"\['GPT2LMHeadModel'\] is not supported; supported: LlamaForCausalLM"):
        LLM(cfg)


def test_quant_resolver_answers_per_layer_name():
    method = object()
    quant = QuantResolver(method, ignore=("lm_head", "re:.*visual.*", "model.layers.1.mlp.down_proj"))
    assert quant.for_layer("model.layers.0.mlp.down_proj") is method
    assert quant.for_layer("model.layers.1.mlp.down_proj") is None
    assert quant.for_layer("model.visual.blocks.0.attn.qkv") is None
    assert quant.for_layer("lm_head") is None
    fused = ("q_proj", "k_proj", "v_proj")
    assert quant.for_layer("model.layers.0.self_attn.qkv_proj", parts=fused) is method
    partly = QuantResolver(method, ignore=("model.layers.0.self_attn.k_proj",))
    with pytest.raises(UserError, match="only some parts of model.layers.0.self_attn.qkv_proj"):
        partly.for_layer("model.layers.0.self_attn.qkv_proj", parts=fused)
    assert QuantResolver().for_layer("model.layers.0.mlp.down_proj") is None


def test_ignored_layer_is_built_in_full_precision():
    """A checkpoint's ignore list reaches the model: that layer gets no quantized storage."""
    import transformers as tf
    from framework.config.schema import QuantizationConfig
    from framework.models.context import ModelContext
    from framework.models.interface import build_model
    hf = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    base = QuantResolver.build(QuantizationConfig("int8"), hf)
    quant = QuantResolver(base.method, ignore=("model.layers.1.mlp.down_proj",))
    model = build_model(ModelContext(hf, torch.float32, 64, quant=quant), "meta")
    assert model.layers[1].mlp.down_proj.quant is None and model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    assert model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert model.layers[1].mlp.gate_up_proj.weight.dtype == torch.int8


def _hf_mrope(q, cos, sin, section):
    """HF's multimodal rotary, written out: cos/sin [3, T, D] (halves repeated), each section
    of the frequencies from its own position row."""
    def pick(t):
        chunks = t.split(section * 2, dim=-1)
        return torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
    cos, sin = pick(cos), pick(sin)
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos + rotated * sin


def test_mrope_rotates_each_section_by_its_own_position_row():
    import kernels
    head_dim, section = 16, [2, 3, 3]
    rotary = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": section})
    positions = torch.tensor([[0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 5, 6], [0, 1, 2, 3, 7, 8]])  # text, then an image
    q = torch.randn(6, 2, head_dim)
    rope = rotary(positions)
    k = torch.randn(6, 1, head_dim)
    cache = torch.zeros(1, 1, 8, head_dim)  # [blocks, kv_heads, block_size, head_dim]
    ours = kernels.rotary_store_kv(q, k, k.clone(), rope.index, rope.cos, rope.sin, cache, cache.clone(),
                                   torch.full((6,), -1))
    freqs = positions[..., None].float() / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((freqs, freqs), dim=-1)  # [3, T, D]
    expected = _hf_mrope(q, emb.cos()[:, :, None], emb.sin()[:, :, None], section)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # text tokens (three equal rows) rotate as their 1-D position would
    flat = rotary(positions[0, :4])
    one_d = kernels.rotary_store_kv(q[:4], k[:4], k[:4].clone(), flat.index, flat.cos, flat.sin, cache, cache.clone(),
                                    torch.full((4,), -1))
    torch.testing.assert_close(ours[:4], one_d)


def test_qwen2_vl_rope_parameters_read_as_mrope():
    class Text:
        rope_parameters = {"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
    params = rope_parameters(Text())
    assert params["rope_type"] == "default" and params["mrope_section"] == [16, 24, 24]


def test_qwen2_5_vl_decoder_alone_matches_hf_on_text(tmp_path):
    """Qwen2.5-VL with every modality at 0 runs its decoder (q/k/v biases, M-RoPE, tied head,
    model.language_model.* names) and matches HF token for token on text prompts."""
    import transformers as tf
    from helpers import PROMPTS, greedy
    torch.manual_seed(0)
    text = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[0], window_size=56)
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                 image_token_id=380, video_token_id=381, vision_start_token_id=382)
    hf = tf.Qwen2_5_VLForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = []
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    cfg = FrameworkConfig()
    cfg.model.path = str(tmp_path)
    with pytest.raises(UserError, match="has no usable processor for images and videos.*multimodal=text_only"):
        LLM(cfg)  # the folder has no preprocessor files: images could not be read
    cfg.multimodal.limit_mm_per_prompt = {"image": 0, "video": 0}
    ours, _ = greedy(cfg, PROMPTS, 8)
    assert ours == expected
