"""Load time and bytes read per rank: TP 1 and 2, sliced (the original checkpoint) vs sharded.

    python -m launchers.bench_load                      # ~0.6 GB bf16 random Llama, CPU
    python -m launchers.bench_load --layers 16 --out /tmp/bench_load.json

Writes a random Llama checkpoint (bf16, as real ones are), saves it sharded at each TP size,
then loads every variant `--repeat` times "cold", after asking the kernel to drop the files
from the page cache (posix_fadvise DONTNEED, no root needed), and as often "warm"; each row is
the median. `load_seconds` is the rank's model construction plus weight loading. The model dtype is
bf16 too, so a sharded file holds exactly the bytes a sliced load reads.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

from framework.config.schema import FrameworkConfig
from framework.tasks import save_sharded


def write_random_llama(folder: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                       vocab: int) -> Path:
    """config.json + model.safetensors of a random Llama, straight from tensors (no HF init)."""
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    head_dim, gen = hidden // heads, torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "mlp.gate_proj.weight": (intermediate, hidden),
                       p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    tensors = {n: (torch.rand(s, generator=gen) * 0.1 - 0.05).to(torch.bfloat16) for n, s in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def drop_page_cache(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def config_for(model_dir: Path, tp: int, load_format: str, quantization: str = "none") -> FrameworkConfig:
    cfg = FrameworkConfig()
    cfg.model.path, cfg.model.load_format, cfg.model.dtype = str(model_dir), load_format, "bfloat16"
    cfg.quantization.method = quantization
    cfg.parallelism.tensor_parallel_size = tp
    cfg.cache.max_model_len, cfg.cache.num_gpu_blocks_override = 256, 16  # the KV cache is not measured
    return cfg


def measure(model_dir: Path, tp: int, load_format: str, quantization: str, cache: str, repeat: int
            ) -> List[Dict[str, Any]]:
    """One row per rank: the median load time of `repeat` fresh starts."""
    from framework.llm import LLM
    runs = []
    for _ in range(repeat):
        if cache == "cold":
            drop_page_cache(model_dir)
        with LLM(config_for(model_dir, tp, load_format, quantization)) as llm:
            runs.append(llm.stats()["ranks"])
    return [{"tp": tp, "load": "sharded" if load_format == "sharded" else "sliced", "quantization": quantization,
             "cache": cache,
             "rank": rank, "load_seconds": statistics.median(run[rank]["load_seconds"] for run in runs),
             "bytes_read": runs[0][rank]["bytes_read"], "weight_bytes": runs[0][rank]["weight_bytes"]}
            for rank in range(tp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quantization", default="none", help="e.g. int8: sliced loads quantize, sharded ones not")
    parser.add_argument("--repeat", type=int, default=3, help="starts per variant; the median is reported")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    ray.init(num_cpus=max(args.tp), include_dashboard=False, logging_level=logging.WARNING)  # once for all runs
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        original = write_random_llama(Path(tmp) / "original", args.hidden, args.intermediate, args.layers,
                                      args.heads, args.kv_heads, args.vocab)
        size = (original / "model.safetensors").stat().st_size
        print(f"random Llama: {size / 2**20:.0f} MiB bf16 checkpoint; {os.cpu_count()} CPUs; torch {torch.__version__}")
        rows: List[Dict[str, Any]] = []
        for tp in args.tp:
            sharded = Path(tmp) / f"tp{tp}"
            cfg = config_for(original, tp, "auto", args.quantization)
            cfg.task.name, cfg.task.output_dir = "save_sharded", str(sharded)
            save_sharded.run(cfg, Path(tmp) / f"run-save-tp{tp}")
            for folder, fmt in ((original, "auto"), (sharded, "sharded")):
                for cache in ("cold", "warm"):
                    rows += measure(folder, tp, fmt, args.quantization, cache, args.repeat)
    ray.shutdown()
    print(f"\nquantization={args.quantization}")
    print(f"{'TP':>3} {'load':>8} {'cache':>5} {'rank':>4} {'seconds':>8} {'MiB read':>9} {'of ckpt':>8}")
    for r in rows:
        print(f"{r['tp']:>3} {r['load']:>8} {r['cache']:>5} {r['rank']:>4} {r['load_seconds']:>8.3f} "
              f"{r['bytes_read'] / 2**20:>9.1f} {r['bytes_read'] / size:>8.3f}")
    if args.out:
        args.out.write_text(json.dumps({"checkpoint_bytes": size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
