"""Qwen2.5-VL benchmark: requests with one 1024x1024 image and 128 output tokens, our engine
against HF transformers `generate` on the same requests in the same process; then planned vs
measured memory with several images a prompt and a pixel cap; then what language_model_only saves.

    python -m launchers.bench_vl --shape framework/assets/shapes/qwen2.5-vl-3b --requests 32 --out bench_vl.json

Dummy weights (the shape's config.json only); the processor is the hub's Qwen2.5-VL settings
(patch 14, merge 2, min_pixels 3136, max_pixels 12845056) around a byte-level tokenizer that puts
Qwen's special tokens at the config's ids, so prompts carry the real placeholder ids.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import framework  # noqa: F401  (torchvision importable before transformers)
import numpy as np
import torch
from PIL import Image

from framework import SamplingParams
from framework.config.schema import FrameworkConfig
from framework.llm import LLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_folder(shape: Path, out: Path) -> Path:
    """config.json of the shape + a processor whose special tokens sit at the config's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast, Qwen2_5_VLProcessor
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(shape / "config.json", out / "config.json")
    config = AutoConfig.from_pretrained(out)
    first_special = min(config.vision_start_token_id, config.image_token_id) - SPECIALS.index("<|vision_start|>")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), first_special)})  # up to Qwen's first special id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    assert fast.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
                                    tokenizer=fast, video_processor=Qwen2VLVideoProcessor())
    processor.save_pretrained(out)
    return out


def requests(folder: Path, n: int, images_per_prompt: int, side: int, seed: int) -> List[Dict[str, Any]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    rng = np.random.RandomState(seed)
    for i in range(n):
        parts = "<|vision_start|><|image_pad|><|vision_end|>" * images_per_prompt
        text = f"<|im_start|>user\n{parts}Describe image {i} in detail.<|im_end|>\n<|im_start|>assistant\n"
        images = [Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8))
                  for _ in range(images_per_prompt)]
        out.append({"prompt": text, "prompt_token_ids": tok(text)["input_ids"], "multi_modal_data": {"image": images}})
    return out


def config(folder: Path, **multimodal: Any) -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path, cfg.model.load_format, cfg.model.dtype = str(folder), "dummy", "bfloat16"
    cfg.cache.max_model_len, cfg.cache.max_num_seqs = 8192, 64
    cfg.compilation.cudagraph_capture_sizes = [1, 2, 4, 8, 16, 32, 64]
    for key, value in multimodal.items():
        setattr(cfg.multimodal, key, value)
    return cfg


def run_ours(cfg: FrameworkConfig, reqs: List[Dict[str, Any]], max_tokens: int, profile: Optional[Path] = None,
             repeat: int = 1) -> Dict[str, Any]:
    from framework.memory.compare import compare_rows
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(cfg) as llm:
        llm.generate([{**reqs[0], "multi_modal_data": {"image": [Image.new("RGB", (448, 448))] *
                                                        len(reqs[0]["multi_modal_data"]["image"])}}],
                     SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up: kernels compile
        prompts = [{k: r[k] for k in ("prompt_token_ids", "multi_modal_data")} for r in reqs]
        runs = []
        for _ in range(repeat):  # a second pass shows what the first spent compiling kernels
            _sync()
            start = time.perf_counter()
            with profiled(profile):
                outs = llm.generate(prompts, params)
                _sync()
            runs.append(time.perf_counter() - start)
            profile = None  # the first pass only
        seconds = runs[-1]
        errors = [o.error for o in outs if o.error]
        assert not errors, errors[0]
        stats = llm.stats()["ranks"][0]
        plan = llm.plan.to_dict() if llm.plan else None
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": round(seconds, 3), "passes_s": [round(r, 3) for r in runs],
            "images_per_s": round(sum(len(r["multi_modal_data"]["image"]) for r in reqs)
                                                               / seconds, 2),
            "output_tok_per_s": round(tokens / seconds, 1), "prompt_tokens": [len(o.prompt_token_ids) for o in outs][:3],
            "stats": stats, "plan": plan, "plan_vs_measured": compare_rows(plan, [stats]) if plan else []}


@contextlib.contextmanager
def profiled(folder: Optional[Path]):
    """With a folder: the host's cProfile (top 40 by cumulative time) and the device's kernels
    (torch.profiler, top 30 by device time) of what runs inside, written there as text."""
    if folder is None:
        yield
        return
    import cProfile
    import io
    import pstats
    folder.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if torch.cuda.is_available() else [])
    host = cProfile.Profile()
    with torch.profiler.profile(activities=activities) as device:
        host.enable()
        yield
        host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(40)
    (folder / "host_profile.txt").write_text(text.getvalue())
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    (folder / "device_profile.txt").write_text(device.key_averages().table(sort_by=sort, row_limit=30))


def run_hf(folder: Path, reqs: List[Dict[str, Any]], max_tokens: int, batch: int) -> Dict[str, Any]:
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    with torch.device(DEVICE):
        model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder),
                                                                 dtype=torch.bfloat16).eval()
    seconds = 0.0
    for lo in range(0, len(reqs), batch):
        chunk = reqs[lo:lo + batch]
        inputs = processor(text=[r["prompt"] for r in chunk], images=[r["multi_modal_data"]["image"] for r in chunk],
                           return_tensors="pt", padding=True).to(DEVICE)
        _sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        _sync()
        seconds += time.perf_counter() - start
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    n_images = sum(len(r["multi_modal_data"]["image"]) for r in reqs)
    return {"seconds": round(seconds, 3), "images_per_s": round(n_images / seconds, 2),
            "output_tok_per_s": round(len(reqs) * max_tokens / seconds, 1), "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=Path, default=Path("framework/assets/shapes/qwen2.5-vl-3b"))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_vl"))
    ap.add_argument("--out", type=Path, default=Path("bench_vl.json"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--side", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--repeat", type=int, default=1, help="timed passes over the requests (the last one counts)")
    ap.add_argument("--profile", type=Path, default=None, help="write host and device profiles of the first pass here")
    ap.add_argument("--throughput-only", action="store_true", help="skip the memory and text-only parts")
    args = ap.parse_args()
    folder = build_folder(args.shape, args.work / "model")
    result: Dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "requests": args.requests,
                              "max_tokens": args.max_tokens, "image": "1024x1024"}
    reqs = requests(folder, args.requests, 1, args.side, seed=0)
    result["ours"] = run_ours(config(folder, limit_mm_per_prompt={"image": 1, "video": 0}), reqs, args.max_tokens,
                              args.profile, args.repeat)
    print(json.dumps({k: v for k, v in result["ours"].items() if k not in ("stats", "plan")}, indent=1), flush=True)
    if not args.skip_hf:
        result["hf"] = run_hf(folder, reqs, args.max_tokens, args.hf_batch)
        result["speedup_images_per_s"] = round(result["ours"]["images_per_s"] / result["hf"]["images_per_s"], 2)
        print(json.dumps(result["hf"]), result["speedup_images_per_s"], flush=True)
    if args.throughput_only:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        return
    # memory: four images a prompt under a 1024x1024 pixel cap, planned vs measured
    four = requests(folder, 8, 4, args.side, seed=1)
    result["four_images"] = run_ours(config(folder, limit_mm_per_prompt={"image": 4, "video": 0},
                                            mm_processor_kwargs={"max_pixels": 1024 * 1024}), four, 32)
    print(json.dumps(result["four_images"]["plan_vs_measured"], indent=1), flush=True)
    # text only: the tower never built
    text = [{"prompt_token_ids": r["prompt_token_ids"][:20], "multi_modal_data": {"image": []}} for r in reqs[:8]]
    lm_only = config(folder, language_model_only=True)
    with LLM(lm_only) as llm:
        llm.generate([{"prompt_token_ids": t["prompt_token_ids"]} for t in text], SamplingParams(max_tokens=8))
        stats = llm.stats()["ranks"][0]
    full = result["ours"]["stats"]
    result["language_model_only"] = {"weight_bytes": stats["weight_bytes"], "full_weight_bytes": full["weight_bytes"],
                                     "saved_bytes": full["weight_bytes"] - stats["weight_bytes"],
                                     "vision_weight_bytes_full": full.get("vision_weight_bytes"),
                                     "kv_tokens": stats["kv_tokens"], "full_kv_tokens": full["kv_tokens"]}
    print(json.dumps(result["language_model_only"]), flush=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
