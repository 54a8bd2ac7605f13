"""InternVL2's original layout (`model_type: internvl_chat`, the checkpoint's own remote code),
read into transformers' InternVL format without running that code.

Two parts, both from the published layout's facts:
- `native_config(config.json)`: the same model as an `InternVLConfig`. An InternLM2 decoder is a
  Llama decoder (InternLM2's `bias` covers q/k/v and o; its rotary `dynamic` NTK rescales only
  past max_position_embeddings); a Qwen2 or Llama decoder keeps its config. The InternViT tower's
  keys are renamed; pixel shuffle `ps_version` v2 is HF's (v1, a transposed fold, is refused).
- `InternVLChatModel.checkpoint_tensors`: each checkpoint tensor under the name transformers
  gives it. InternLM2 fuses q, k and v into `wqkv`, grouped per KV head as [q heads of the
  group..., k, v]; InternViT fuses them into `qkv` as [q; k; v]. Renamed and [q; k; v] tensors stay
  lazy (a text-only run never reads the tower's); `wqkv` is read whole and regrouped.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import torch

from framework.config.errors import UserError
from framework.models.internvl import InternVLForConditionalGeneration

ARCHITECTURE = "InternVLChatModel"
MODEL_TYPE = "internvl_chat"

# InternLM2 decoder names -> Llama's, inside language_model.model.layers.N.
_DECODER = {"attention.wo.": "self_attn.o_proj.", "feed_forward.w1.": "mlp.gate_proj.",
            "feed_forward.w3.": "mlp.up_proj.", "feed_forward.w2.": "mlp.down_proj.",
            "attention_norm.": "input_layernorm.", "ffn_norm.": "post_attention_layernorm."}
# InternViT names -> HF's, inside the tower's layer N
_VISION_LAYER = {"attn.proj.": "attention.projection_layer.", "attn.q_norm.": "attention.q_norm.",
                 "attn.k_norm.": "attention.k_norm.", "norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
                 "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.", "ls1": "lambda_1", "ls2": "lambda_2"}
_RENAMED = {"vision_model.embeddings.class_embedding": "vision_tower.embeddings.cls_token",
            "vision_model.embeddings.position_embedding": "vision_tower.embeddings.position_embeddings",
            "vision_model.embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
            "vision_model.embeddings.patch_embedding.bias": "vision_tower.embeddings.patch_embeddings.projection.bias",
            "mlp1.0.weight": "multi_modal_projector.layer_norm.weight", "mlp1.0.bias": "multi_modal_projector.layer_norm.bias",
            "mlp1.1.weight": "multi_modal_projector.linear_1.weight", "mlp1.1.bias": "multi_modal_projector.linear_1.bias",
            "mlp1.3.weight": "multi_modal_projector.linear_2.weight", "mlp1.3.bias": "multi_modal_projector.linear_2.bias",
            "language_model.model.tok_embeddings.weight": "language_model.model.embed_tokens.weight",
            "language_model.output.weight": "language_model.lm_head.weight"}


def _text_config(llm: Dict[str, Any]) -> Dict[str, Any]:
    model_type = llm.get("model_type")
    if model_type in ("qwen2", "llama"):  # InternVL2-1B, InternVL2.5's Qwen2 decoders: same names as HF's
        return {k: v for k, v in llm.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    if model_type != "internlm2":
        raise UserError(f"internvl_chat: llm_config.model_type {model_type!r} is not supported; supported: "
                        "internlm2, qwen2, llama")
    bias = bool(llm.get("bias", False))
    rope = dict(llm.get("rope_scaling") or {})
    rope_type = rope.pop("type", None) or rope.pop("rope_type", None) or "default"
    return dict(model_type="llama", vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
                intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_hidden_layers"],
                num_attention_heads=llm["num_attention_heads"],
                num_key_value_heads=llm.get("num_key_value_heads") or llm["num_attention_heads"],
                max_position_embeddings=llm.get("max_position_embeddings", 2048),
                rms_norm_eps=llm.get("rms_norm_eps", 1e-6), hidden_act=llm.get("hidden_act", "silu"),
                attention_bias=bias, mlp_bias=False,
                rope_parameters=dict(rope, rope_type=rope_type, rope_theta=float(llm.get("rope_theta", 10000.0))),
                tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
                bos_token_id=llm.get("bos_token_id"), eos_token_id=llm.get("eos_token_id"),
                pad_token_id=llm.get("pad_token_id"))


def native_config(raw: Dict[str, Any]) -> Any:
    """config.json of the internvl_chat layout -> the same model as transformers' InternVLConfig,
    its architecture InternVLChatModel (so the loader renames the tensors)."""
    try:
        return _native_config(raw)
    except KeyError as exc:
        raise UserError(f"config.json of model_type 'internvl_chat' lacks the key {exc.args[0]!r} "
                        "(llm_config and vision_config are required)") from None


def _native_config(raw: Dict[str, Any]) -> Any:
    from transformers import InternVLConfig
    if raw.get("ps_version", "v2") != "v2":
        raise UserError(f"internvl_chat: ps_version {raw.get('ps_version')!r} is not supported; supported: v2")
    v = raw["vision_config"]
    side, patch = int(raw.get("force_image_size") or v["image_size"]), int(v["patch_size"])
    vision = dict(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                  num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                  image_size=[side, side], patch_size=[patch, patch], num_channels=v.get("num_channels", 3),
                  attention_bias=bool(v.get("qkv_bias", True)), use_qk_norm=bool(v.get("qk_normalization", False)),
                  norm_type=v.get("norm_type", "rms_norm"), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
                  hidden_act=v.get("hidden_act", "gelu"), use_mean_pooling=True)
    text = _text_config(raw["llm_config"])
    tied = text.get("tie_word_embeddings", False)
    return InternVLConfig(text_config=text, vision_config=vision, downsample_ratio=raw.get("downsample_ratio", 0.5),
                          vision_feature_layer=raw.get("select_layer", -1), vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", tie_word_embeddings=tied, architectures=[ARCHITECTURE],
                          image_seq_length=int((side // patch * raw.get("downsample_ratio", 0.5)) ** 2))


class InternVLChatModel(InternVLForConditionalGeneration):
    """transformers' InternVL model, loading a checkpoint written in the internvl_chat layout."""

    def checkpoint_tensors(self, name: str, tensor: Any) -> Iterator[Tuple[str, Any]]:
        """One checkpoint tensor -> (transformers' name, tensor) pairs (lazy where it can stay lazy)."""
        if name in _RENAMED:
            yield _RENAMED[name], tensor
            return
        if name.startswith("vision_model.encoder.layers."):
            index, rest = name[len("vision_model.encoder.layers."):].split(".", 1)
            prefix = f"vision_tower.encoder.layer.{index}."
            if rest.startswith("attn.qkv."):
                suffix, width = rest[len("attn.qkv."):], tensor.shape[0] // 3
                for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                    yield f"{prefix}attention.{part}.{suffix}", tensor.narrow(0, i * width, width)
                return
            for old, new in _VISION_LAYER.items():
                if rest.startswith(old):
                    yield prefix + new + rest[len(old):], tensor
                    return
        if name.startswith("language_model.model.layers."):
            if ".attention.wqkv." in name:
                yield from self._split_wqkv(name, tensor)
                return
            for old, new in _DECODER.items():
                if f".{old}" in name:
                    yield name.replace(f".{old}", f".{new}"), tensor
                    return
        yield name, tensor  # already transformers' name (a Qwen2 decoder, the final norm)

    def _split_wqkv(self, name: str, tensor: Any) -> Iterator[Tuple[str, torch.Tensor]]:
        a = self.args
        groups = a.num_heads // a.num_kv_heads
        full = tensor.materialize() if hasattr(tensor, "materialize") else tensor
        rows = full.reshape(a.num_kv_heads, groups + 2, a.head_dim, *full.shape[1:])
        base, suffix = name.split(".attention.wqkv.")
        yield f"{base}.self_attn.q_proj.{suffix}", rows[:, :groups].reshape(-1, *full.shape[1:])
        yield f"{base}.self_attn.k_proj.{suffix}", rows[:, groups].reshape(-1, *full.shape[1:])
        yield f"{base}.self_attn.v_proj.{suffix}", rows[:, groups + 1].reshape(-1, *full.shape[1:])
