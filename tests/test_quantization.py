"""quantization.method: round-trip error bounds, load-time quantization per shard and rank, the
engine end to end (weight bytes, greedy tokens, perplexity), and compressed-tensors checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from framework import FrameworkConfig, SamplingParams
from framework.config.errors import ConfigError, UserError
from framework.config.schema import QuantizationConfig
from framework.layers import linear
from framework.layers.quantization import get_quant_method
from framework.layers.quantization.fp8 import FP8, WEIGHT_ONLY_MAX_ROWS, dequantize_fp8, quantize_fp8
from framework.layers.quantization.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from framework.layers.quantization.int8 import dequantize_int8, quantize_int8
from framework.llm import LLM
from framework.parallel import ParallelInfo
from framework.tasks import eval as eval_task

GROUP = 32  # divides every input width of the tiny model (64 and 96)
INIT = 0.1  # weights large enough that logits are peaked: greedy tokens are not coin flips
TEXT = list(range(1, 300, 2)) * 2  # for perplexities that only need to be equal
PROMPTS = [[1, 5, 7, 9, 11], list(range(10, 47)), [200, 7], list(range(100, 164)), [42, 17, 301, 5, 99, 250]]


def random_weight(rows=48, cols=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] *= 40  # an outlier row must not cost the others precision
    w[5] = 0  # an all-zero row must survive (no 0/0)
    w[7, 11] = 3.0  # an outlier inside one row/group
    return w


# --- round trips --------------------------------------------------------------------------
def test_int8_round_trip_within_half_a_step_per_row():
    w = random_weight()
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and scale.shape == (w.shape[0],)
    err = (dequantize_int8(codes, scale) - w).abs()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert (err <= step / 2 + 1e-7).all()
    assert err[5].max() == 0
    assert codes.abs().max() == 127


def test_fp8_round_trip_within_three_mantissa_bits():
    w = random_weight()
    codes, scale = quantize_fp8(w)
    assert codes.dtype == FP8
    err = (dequantize_fp8(codes, scale) - w).abs()
    # relative 2^-4 for normal values; subnormals (below 2^-6 of the scale) err by at most 2^-10 of it
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert not torch.isnan(dequantize_fp8(codes, scale)).any()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_within_half_a_step_per_group(scale_dtype):
    w = random_weight()
    codes, scale = quantize_int4(w, GROUP, scale_dtype)
    assert codes.shape == (48, 64) and codes.dtype == torch.uint8
    assert scale.shape == (48, 128 // GROUP) and scale.dtype == scale_dtype
    err = (dequantize_int4(codes, scale) - w).abs().view(48, -1, GROUP)
    assert (err <= scale.float()[..., None] / 2 * (1 + 1e-6)).all()  # the stored scale is the one used
    absmax = w.abs().view(48, -1, GROUP).amax(-1, keepdim=True)
    assert (err <= absmax / 14 * (1 + 2**-7)).all()


def test_int4_packing_layout():
    q = torch.arange(-8, 8).repeat(3, 2)  # every code, [3, 32]
    packed = pack_int4(q)
    assert packed.shape == (3, 16)
    # column 2j in the low nibble, 2j+1 in the high one, each stored as q + 8
    assert int(packed[0, 0]) == ((-8 + 8) | ((-7 + 8) << 4))
    assert int(packed[0, 3]) == ((-2 + 8) | ((-1 + 8) << 4))
    assert torch.equal(unpack_int4(packed), q.to(torch.int8))


def test_error_grows_with_fewer_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    err = {"int8": (dequantize_int8(*quantize_int8(w)) - w).pow(2).mean(),
           "fp8": (dequantize_fp8(*quantize_fp8(w)) - w).pow(2).mean(),
           "int4": (dequantize_int4(*quantize_int4(w, GROUP)) - w).pow(2).mean()}
    assert err["int8"] < err["fp8"] < err["int4"] < 0.01 * w.pow(2).mean()


# --- load-time quantization: per shard, per rank --------------------------------------------
def fake_quant(method: str, w: torch.Tensor) -> torch.Tensor:
    if method == "int8":
        return dequantize_int8(*quantize_int8(w))
    if method == "fp8":
        return dequantize_fp8(*quantize_fp8(w))
    return dequantize_int4(*quantize_int4(w, GROUP))


def dequantized(layer) -> torch.Tensor:
    if layer.weight.dtype == torch.uint8:
        return dequantize_int4(layer.weight, layer.weight_scale)
    return dequantize_int8(layer.weight, layer.weight_scale)  # the same formula for fp8 codes


def build_and_load(kind: str, quant, checkpoint, tp: ParallelInfo):
    if kind == "qkv":
        layer = linear.QKVParallelLinear(64, 16, 4, 2, quant=quant, tp=tp)
        for shard, tensor in zip("qkv", checkpoint):
            layer.weight.weight_loader(layer.weight, tensor, shard)
    elif kind == "merged":
        layer = linear.MergedColumnParallelLinear(64, [96, 96], quant=quant, tp=tp)
        for shard, tensor in enumerate(checkpoint):
            layer.weight.weight_loader(layer.weight, tensor, shard)
    else:
        layer = linear.RowParallelLinear(128, 64, quant=quant, tp=tp)
        layer.weight.weight_loader(layer.weight, checkpoint[0])
    return layer


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("kind", ["qkv", "merged", "row"])
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_quantizes_exactly_its_rows(method, kind, rank):
    """Two-way TP, as rank `rank`: the quantized layer equals fake-quantizing what the
    full-precision layer loads, so quantizing shard by shard loses nothing."""
    tp = ParallelInfo(rank, 2)
    g = torch.Generator().manual_seed(0)
    shapes = {"qkv": [(64, 64), (32, 64), (32, 64)], "merged": [(96, 64)] * 2, "row": [(64, 128)]}[kind]
    checkpoint = [torch.randn(s, generator=g) for s in shapes]
    quant = get_quant_method(QuantizationConfig(method=method, group_size=GROUP), None)
    reference = build_and_load(kind, None, checkpoint, tp)
    layer = build_and_load(kind, quant, checkpoint, tp)
    assert torch.equal(dequantized(layer), fake_quant(method, reference.weight))
    x = torch.randn(3, layer.in_features, generator=g)
    torch.testing.assert_close(layer.matmul(x), x @ fake_quant(method, reference.weight).T, rtol=1e-5, atol=1e-5)


# --- the engine end to end ----------------------------------------------------------------
def make_config(model_dir, method="none", **quant) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path = str(model_dir)
    cfg.cache.cpu_kvcache_space_gib = 0.05
    cfg.cache.block_size = 8
    cfg.quantization.method = method
    cfg.quantization.group_size = GROUP
    for key, value in quant.items():
        setattr(cfg.quantization, key, value)
    return cfg


def run_engine(cfg, sample_ids=None):
    """Greedy tokens, weight bytes and (on `sample_ids`) perplexity of one configuration."""
    with LLM(cfg) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        ppl = eval_task.perplexity(llm, sample_ids, 128).perplexity if sample_ids else None
        return [o.token_ids for o in outs], llm.stats()["ranks"][0]["weight_bytes"], ppl


@pytest.fixture(scope="module")
def peaked_model(tiny_model):
    return tiny_model("llama", initializer_range=INIT)


@pytest.fixture(scope="module")
def baseline(peaked_model):
    tokens, weight_bytes, ppl = run_engine(make_config(peaked_model), TEXT)
    return {"tokens": tokens, "bytes": weight_bytes, "ppl": ppl}


@pytest.fixture(scope="module")
def sampled(tiny_model):
    """A sharper random model and text it samples itself: any perturbation of the model raises
    its expected perplexity on that text (by the KL divergence), so the rise is what a method
    costs. (Sharper weights make int4's cost stand out of the sampling noise.)"""
    model_dir = tiny_model("llama", initializer_range=2 * INIT)
    with LLM(make_config(model_dir)) as llm:
        outs = llm.generate([{"prompt_token_ids": [i]} for i in range(1, 9)],
                            SamplingParams(max_tokens=63, temperature=1.0, seed=0, ignore_eos=True))
    text = [t for o in outs for t in o.prompt_token_ids + o.token_ids]
    return model_dir, text, run_engine(make_config(model_dir), text)[2]


def linear_shapes(hidden=64, inter=96, heads=4, kv_heads=2, head_dim=16, layers=2):
    per_layer = [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim),
                 (2 * inter, hidden), (hidden, inter)]
    return per_layer * layers


def expected_weight_bytes(full_bytes: int, method: str) -> int:
    """Full-precision float32 bytes with each linear weight swapped for its quantized storage."""
    total = full_bytes
    for out, inp in linear_shapes():
        total -= out * inp * 4
        if method in ("int8", "fp8"):
            total += out * inp + out * 4  # codes + a float32 scale per row
        else:
            total += out * inp // 2 + out * (inp // GROUP) * 4  # two codes a byte + model-dtype scales
    return total


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_engine_weight_bytes_and_greedy_tokens(peaked_model, baseline, method):
    tokens, weight_bytes, _ = run_engine(make_config(peaked_model, method))
    assert weight_bytes == expected_weight_bytes(baseline["bytes"], method)
    assert weight_bytes < 0.65 * baseline["bytes"]  # the embeddings and lm_head stay float32
    first_equal = sum(t[0] == b[0] for t, b in zip(tokens, baseline["tokens"]))
    if method == "int8":
        assert first_equal == len(PROMPTS)
        assert sum(t == b for t, b in zip(tokens, baseline["tokens"])) >= 3
    elif method == "fp8":
        assert first_equal >= len(PROMPTS) - 1
    else:
        assert all(len(t) == 6 for t in tokens)


def test_perplexity_rises_slightly_for_8_bits_more_for_int4(sampled):
    model_dir, text, base_ppl = sampled
    rise = {m: run_engine(make_config(model_dir, m), text)[2] / base_ppl - 1 for m in ("int8", "fp8", "int4")}
    assert abs(rise["int8"]) < 0.01 and abs(rise["fp8"]) < 0.03, rise
    assert rise["int4"] > max(0.05, 3 * abs(rise["int8"]), 3 * abs(rise["fp8"])), rise


def test_dummy_weights_quantize_too(peaked_model, baseline):
    cfg = make_config(peaked_model, "int4")
    cfg.model.load_format = "dummy"
    tokens, weight_bytes, _ = run_engine(cfg)
    assert weight_bytes == expected_weight_bytes(baseline["bytes"], "int4")
    assert all(len(t) == 6 for t in tokens)


def test_group_size_must_divide_every_layer(peaked_model):
    with pytest.raises(ConfigError, match=r"quantization\.group_size=48: .*valid: 1, 2, 4, 8, 16, 32$"):
        LLM(make_config(peaked_model, "int4", group_size=48))


def test_eval_task_writes_perplexity(peaked_model, tmp_path, monkeypatch, capsys):
    """task=eval on the default text (pydoc_data) needs a tokenizer: train a tiny one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from pydoc_data.topics import topics

    model_dir = tmp_path / "model"
    shutil.copytree(peaked_model, model_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics["assert"]], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(model_dir)

    monkeypatch.setattr(eval_task, "MAX_TOKENS", 1024)
    assert eval_task.run(make_config(model_dir, "int8"), tmp_path / "run") == 0
    record = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert record["quantization"] == "int8" and record["scored_tokens"] == 1024 - 4  # 4 windows of 256
    assert 1 < record["perplexity"] < float("inf") and record["weight_bytes"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]["perplexity"] == record["perplexity"]

    # task.quantizations: every method in one run, one table
    monkeypatch.setattr(eval_task, "MAX_TOKENS", 512)
    monkeypatch.setattr(eval_task, "DECODE_TOKENS", 8)
    cfg = make_config(model_dir, "none")
    cfg.task.quantizations = ["none", "int8"]
    assert eval_task.run(cfg, tmp_path / "table") == 0
    runs = json.loads((tmp_path / "table" / "eval.json").read_text())["runs"]
    assert [r["quantization"] for r in runs] == ["none", "int8"]
    assert runs[1]["weight_bytes"] < runs[0]["weight_bytes"] and all(r["decode_tok_s"] > 0 for r in runs)
    assert abs(runs[1]["perplexity"] / runs[0]["perplexity"] - 1) < 0.01
    assert "| int8 |" in capsys.readouterr().out


BUNDLED = Path(__file__).resolve().parents[1] / "framework" / "assets" / "pydoc-llama"


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled model not built")
def test_bundled_model_perplexity_cost_by_method(monkeypatch, tmp_path):
    """The trained bundled model on task=eval's default text (first 1024 tokens): 8-bit methods
    cost almost nothing, int4 (group_size 16: its 688-wide MLP allows no more) clearly more."""
    monkeypatch.setattr(eval_task, "MAX_TOKENS", 1024)
    ppl = {}
    for method in ("none", "int8", "fp8", "int4"):
        cfg = make_config(BUNDLED, method, group_size=16)
        cfg.cache.cpu_kvcache_space_gib = 0.02
        cfg.task.name = "eval"
        assert eval_task.run(cfg, tmp_path / method) == 0
        ppl[method] = json.loads((tmp_path / method / "eval.json").read_text())["perplexity"]
    rise = {m: ppl[m] / ppl["none"] - 1 for m in ("int8", "fp8", "int4")}
    assert abs(rise["int8"]) < 0.003 and abs(rise["fp8"]) < 0.005, ppl
    assert 0.003 < rise["int4"] < 0.05 and rise["int4"] > 3 * max(rise["int8"], rise["fp8"]), ppl


# --- pre-quantized checkpoints (quantization.method=auto) ----------------------------------
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


# what llm-compressor writes for FP8_DYNAMIC: fp8 activations, one scale per token at run time
DYNAMIC_FP8_TOKENS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                      "group_size": None, "actorder": None, "observer": None}


def compressed_tensors_config(fmt: str, num_bits: int, type_: str, strategy: str, group_size=None,
                              input_activations=None) -> dict:
    weights = {"num_bits": num_bits, "type": type_, "symmetric": True, "strategy": strategy,
               "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": input_activations, "output_activations": None}}}


def compress(w: torch.Tensor, scheme: str):
    """One weight in the documented compressed-tensors layout, written independently of the
    code under test; returns (stored tensors by suffix, the weight they dequantize to)."""
    w = w.float()
    if scheme in ("int8-channel", "fp8-channel", "int8-tensor", "fp8-w8a8"):
        per_row = scheme.endswith("channel")
        absmax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max().reshape(1, 1)
        if scheme.startswith("fp8"):
            scale = absmax / 448
            q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            scale = absmax / 127
            q = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
        stored_scale = scale if per_row else scale.reshape(1)
        return {"weight": q, "weight_scale": stored_scale}, q.float() * scale
    # pack-quantized int4, group-wise: eight codes per int32, column 8j+i in bits 4i.., as q + 8
    rows, cols = w.shape
    groups = w.view(rows, cols // GROUP, GROUP)
    scale = groups.abs().amax(-1, keepdim=True) / 7.5
    q = torch.round(groups / scale).clamp(-8, 7).view(rows, cols).to(torch.int64)
    nibbles = (q + 8).view(rows, cols // 8, 8)
    words = (nibbles << (4 * torch.arange(8))).sum(-1)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    deq = (q.view(rows, cols // GROUP, GROUP).float() * scale).view(rows, cols)
    return ({"weight_packed": packed, "weight_shape": torch.tensor([rows, cols]),
             "weight_scale": scale.squeeze(-1)}, deq)


SCHEMES = {
    "int8-channel": ("int-quantized", 8, "int", "channel", None),
    "int8-tensor": ("int-quantized", 8, "int", "tensor", None),
    "fp8-channel": ("float-quantized", 8, "float", "channel", None),
    "fp8-w8a8": ("float-quantized", 8, "float", "channel", None, DYNAMIC_FP8_TOKENS),  # weight-only on CPU
    "int4-group": ("pack-quantized", 4, "int", "group", GROUP),
}


def write_compressed(source: Path, out: Path, scheme: str) -> Path:
    """`source` as a compressed-tensors checkpoint at `out`, and its dequantized twin at out-float."""
    tensors = load_file(str(source / "model.safetensors"))
    packed, dequant = {}, {}
    for name, tensor in tensors.items():
        if not name.endswith(LINEAR_SUFFIXES):
            packed[name] = dequant[name] = tensor
            continue
        stored, deq = compress(tensor, scheme)
        prefix = name[: -len("weight")]
        packed.update({prefix + suffix: t for suffix, t in stored.items()})
        dequant[name] = deq
    twin = out.parent / f"{out.name}-float"
    for folder, state in ((out, packed), (twin, dequant)):
        shutil.copytree(source, folder)
        save_file(state, str(folder / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = compressed_tensors_config(*SCHEMES[scheme])
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_auto_loads_compressed_tensors_as_stored(peaked_model, baseline, tmp_path, scheme):
    """method=auto on the packed checkpoint runs the same model as its dequantized twin in full precision."""
    ckpt = write_compressed(peaked_model, tmp_path / scheme, scheme)
    tokens, weight_bytes, ppl = run_engine(make_config(ckpt, "auto"), TEXT)
    twin_tokens, _, twin_ppl = run_engine(make_config(tmp_path / f"{scheme}-float"), TEXT)
    assert tokens == twin_tokens
    assert ppl == pytest.approx(twin_ppl, rel=1e-4)
    assert weight_bytes == expected_weight_bytes(baseline["bytes"], "int4" if scheme.startswith("int4") else "int8")


def test_auto_on_a_full_precision_checkpoint_is_none(peaked_model, baseline):
    expected = (baseline["tokens"], baseline["bytes"], baseline["ppl"])
    assert run_engine(make_config(peaked_model, "auto"), TEXT) == expected


def test_checkpoint_errors_are_one_line(peaked_model, tmp_path):
    ckpt = write_compressed(peaked_model, tmp_path / "ct", "int8-channel")
    with pytest.raises(UserError, match="already quantized.*quantization.method=auto"):
        LLM(make_config(ckpt, "int8"))
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="asymmetric\\) is not supported; supported: int8"):
        LLM(make_config(ckpt, "auto"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantization 'gptq' is not supported; supported: compressed-tensors"):
        LLM(make_config(ckpt, "auto"))


# --- W8A8 fp8 -------------------------------------------------------------------------------
@pytest.mark.parametrize("acts,w8a8", [(None, False), (DYNAMIC_FP8_TOKENS, True),
                                       ({**DYNAMIC_FP8_TOKENS, "strategy": "tensor", "dynamic": False}, False),
                                       ({**DYNAMIC_FP8_TOKENS, "type": "int"}, False)])
def test_compressed_tensors_fp8_runs_its_activation_scheme(acts, w8a8):
    """Dynamic per-token fp8 activations take the W8A8 path; a weight-only fp8 checkpoint and
    schemes we do not run (static per-tensor input scales, int8 activations) stay weight-only."""
    qc = compressed_tensors_config("float-quantized", 8, "float", "channel", input_activations=acts)
    method = get_quant_method(QuantizationConfig(method="auto"), type("Cfg", (), {"quantization_config": qc})())
    assert method.name == "compressed-tensors fp8" and method.quantize_activations is w8a8


def test_quantization_fp8_quantizes_activations():
    assert get_quant_method(QuantizationConfig(method="fp8"), object()).quantize_activations


@pytest.mark.gpu
def test_fp8_w8a8_end_to_end_on_gpu(sampled, monkeypatch):
    """quantization=fp8 in bf16 on an fp8 card: steps of more than WEIGHT_ONLY_MAX_ROWS tokens run W8A8,
    and the perplexity stays within 10% of bf16's own on the text the model sampled."""
    import kernels
    model_dir, text, _ = sampled
    calls = []
    real = kernels.fp8_linear
    monkeypatch.setattr(kernels, "fp8_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))

    def gpu(method):
        cfg = make_config(model_dir, method)
        cfg.model.device, cfg.model.dtype = "cuda", "bfloat16"
        cfg.cache.max_model_len, cfg.cache.max_num_seqs, cfg.cache.gpu_memory_utilization = 256, 8, 0.3
        return cfg

    _, _, bf16_ppl = run_engine(gpu("none"), text)
    tokens, _, fp8_ppl = run_engine(gpu("fp8"), text)
    # prefill steps; decode batches (<= 8 rows here) stay weight-only
    assert calls and min(calls) > WEIGHT_ONLY_MAX_ROWS
    assert all(len(t) == 6 for t in tokens)
    print(f"perplexity bf16 {bf16_ppl:.4f}, fp8 W8A8 {fp8_ppl:.4f}")
    assert abs(fp8_ppl / bf16_ppl - 1) < 0.1, (fp8_ppl, bf16_ppl)


DYNAMIC_INT8_TOKENS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
                       "group_size": None, "actorder": None}


@pytest.mark.parametrize("acts,w8a8", [(None, False), (DYNAMIC_INT8_TOKENS, True),
                                       ({**DYNAMIC_INT8_TOKENS, "strategy": "tensor", "dynamic": False}, False),
                                       ({**DYNAMIC_INT8_TOKENS, "symmetric": False}, False)])
def test_compressed_tensors_int8_runs_its_activation_scheme(acts, w8a8):
    """llm-compressor's W8A8 int8 (dynamic per-token int8 activations) runs W8A8 like quantization=int8;
    static or asymmetric activations run weight-only."""
    qc = compressed_tensors_config("int-quantized", 8, "int", "channel", input_activations=acts)
    method = get_quant_method(QuantizationConfig(method="auto"), type("Cfg", (), {"quantization_config": qc})())
    assert method.name == "compressed-tensors int8" and method.quantize_activations is w8a8


def test_quantization_int8_quantizes_activations():
    assert get_quant_method(QuantizationConfig(method="int8"), object()).quantize_activations


@pytest.mark.gpu
def test_int8_w8a8_end_to_end_on_gpu(sampled, monkeypatch):
    """quantization=int8 in bf16 on CUDA: prefill steps run W8A8 on int8 tensor cores, and the
    perplexity stays within 10% of bf16's own on the text the model sampled."""
    import kernels
    model_dir, text, _ = sampled
    calls = []
    real = kernels.int8_linear
    monkeypatch.setattr(kernels, "int8_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))

    def gpu(method):
        cfg = make_config(model_dir, method)
        cfg.model.device, cfg.model.dtype = "cuda", "bfloat16"
        cfg.cache.max_model_len, cfg.cache.max_num_seqs, cfg.cache.gpu_memory_utilization = 256, 8, 0.3
        return cfg

    _, _, bf16_ppl = run_engine(gpu("none"), text)
    tokens, _, int8_ppl = run_engine(gpu("int8"), text)
    assert calls and min(calls) > WEIGHT_ONLY_MAX_ROWS
    assert all(len(t) == 6 for t in tokens)
    print(f"perplexity bf16 {bf16_ppl:.4f}, int8 W8A8 {int8_ppl:.4f}")
    assert abs(int8_ppl / bf16_ppl - 1) < 0.1, (int8_ppl, bf16_ppl)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 5, 64, 65, 300, 1100])
def test_int4_dispatch_on_gpu_matches_the_format(rows):
    """Every path int4_linear takes on the card (tinygemm on its repacked copy, the GEMV,
    quant_matmul, w4a16_matmul, the unpack + cuBLAS from DEQUANT_ROWS) against the format's own
    dequantization, bf16. N = 264 (not a multiple of 16) keeps the MMA GEMV out: its own tests
    are in tests/kernels/test_kernel_int4_mma_gemv.py."""
    from framework.layers.linear import ReplicatedLinear
    from framework.layers.quantization.int4 import Int4Method

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            layer = ReplicatedLinear(512, 264, bias=False, quant=Int4Method(128, tinygemm=True))
    finally:
        torch.set_default_dtype(previous)
    assert layer.weight_int4pack.dtype == torch.int32  # CUDA and bf16: the tinygemm copy exists
    layer.weight.fill_dummy(torch.Generator(device="cuda").manual_seed(rows))
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ dequantize_int4(layer.weight, layer.weight_scale.float()).T
    torch.testing.assert_close(layer(x).float(), expected, atol=3e-2, rtol=3e-2)


def test_int4_tinygemm_copy_is_counted_but_never_saved():
    """With int4_tinygemm on a CUDA model, layers of bf16 shapes tinygemm takes carry the copy
    (the planner counts it: test_planner), a sharded checkpoint leaves it out (the loading run
    remakes it), and on the CPU it stays unmade."""
    from framework.layers.linear import ReplicatedLinear
    from framework.layers.quantization.int4 import Int4Method
    from framework.loader.sharded import held_tensors

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = torch.nn.Sequential(ReplicatedLinear(256, 24, bias=False, quant=Int4Method(128, tinygemm=True)),
                                    ReplicatedLinear(256, 20, bias=False, quant=Int4Method(128, tinygemm=True)))
    finally:
        torch.set_default_dtype(previous)
    assert model[0].weight_int4pack.shape == (3, 2, 32, 4) and model[0].weight_scale_zeros.shape == (2, 24, 2)
    assert not hasattr(model[1], "weight_int4pack")  # 20 rows: tinygemm packs 8 at a time
    assert sorted(held_tensors(model)) == ["0.weight", "0.weight_scale", "1.weight", "1.weight_scale"]
    model[0].weight.fill_dummy(torch.Generator().manual_seed(0))
    assert not model[0].weight_int4pack.any()


def test_int4_tinygemm_copy_of_shards_ending_mid_eight(monkeypatch):
    """tinygemm packs eight rows together: QKV shards of 24 / 4 / 4 rows (head_dim 4, 6 query
    heads, 1 KV head) share rows 24-31 between k and v, which each repacks whole as it arrives, so
    the copy ends as one pack of the whole weight. (`pack` here is a stand-in with the real one's
    row blocks: eight rows -> one [K/128, 32, 4] block of int32.)"""
    from framework.layers.linear import QKVParallelLinear
    from framework.layers.quantization.int4 import Int4Method
    from kernels import int4_tinygemm as tg

    def fake_pack(codes: torch.Tensor) -> torch.Tensor:
        return codes.contiguous().view(torch.int32).reshape(codes.shape[0] // 8, -1, 32, 4)

    monkeypatch.setattr(tg, "can_pack", lambda t: True)
    monkeypatch.setattr(tg, "pack", fake_pack)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = QKVParallelLinear(256, 4, 6, 1, bias=False, quant=Int4Method(128, tinygemm=True))
    finally:
        torch.set_default_dtype(previous)
    assert layer.weight_int4pack.shape == (4, 2, 32, 4)
    gen = torch.Generator().manual_seed(0)
    for shard in ("v", "q", "k"):  # any order
        offset, size, _ = layer.output_rows(shard)
        layer.quant.store(layer, offset, torch.randn(size, 256, generator=gen) * 0.05)
    assert torch.equal(layer.weight_int4pack, fake_pack(layer.weight))
    assert torch.equal(layer.weight_scale_zeros[..., 0], layer.weight_scale.T)
