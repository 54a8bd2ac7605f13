"""The typed schema of every knob: one dataclass per Hydra config group.

These dataclasses are the only thing the engine sees. Hydra composes YAML into them
(`framework.config.store` registers them as the schema), and library users may build
them by hand. Field comments are the documentation of each knob; README's knob table
repeats the memory trade-off of the important ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Dict, List, Optional


@dataclass
class ModelConfig:
    # A local HF folder, the name of a bundled model (framework/assets/NAME) or a hub id
    # already present in the local HF cache (nothing is ever downloaded).
    path: str = "pydoc-llama"
    tokenizer: Optional[str] = None  # defaults to `path`; a folder, or a hub id in the local HF cache
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = float32 on CPU, checkpoint dtype on GPU
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights) | sharded (task=save_sharded output)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # seeds dummy weights and unseeded sampling


@dataclass
class ParallelConfig:
    # Weights and KV heads are split over this many ranks (GPUs, or CPU processes with gloo).
    tensor_parallel_size: int = 1
    # TP on GPUs of one host: all-reduces of up to 16 MB (decode steps) through NVLink peer memory
    # instead of NCCL's ring (framework/symm_all_reduce.py). vLLM: disable_custom_all_reduce.
    custom_all_reduce: bool = True


@dataclass
class QuantizationConfig:
    # none | fp8 | int8 | int4 (weights quantized at load) | auto (read the checkpoint's quantization_config)
    method: str = "none"
    group_size: int = 128  # int4: weights per scale along the input dimension
    # int4 on CUDA with bf16: keep a second copy of the codes in PyTorch's tinygemm layout for
    # decode steps of up to 4 tokens (batch-1 decode ~1.4x bf16 against ~1.2x without; BENCHMARKS.md).
    # Off by default: it costs another half byte a weight (3.45 GiB on an 8B), a third of what
    # int4 is chosen to save; true trades that memory for batch-1 speed.
    int4_tinygemm: bool = False


class CompilationLevel(IntEnum):
    """vLLM's compilation levels; YAML may give the name or the number."""

    NO_COMPILATION = 0
    DYNAMO_AS_IS = 1
    DYNAMO_ONCE = 2
    PIECEWISE = 3


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    # Longest prompt + output a request may have; null = the model's limit; "auto" = the longest that fits.
    max_model_len: Optional[Any] = None
    allow_long_max_model_len: bool = False  # permit max_model_len above config.json's limit
    max_num_seqs: Optional[Any] = 256  # concurrent sequences per step; "auto" = the most that fit
    # Tokens per step; prompts longer than this prefill in chunks. null = by the device: 8192 on GPUs
    # of 70 GiB or more, else 2048 (framework/resolve.py).
    max_num_batched_tokens: Optional[int] = None
    gpu_memory_utilization: float = 0.9  # share of GPU memory this engine may use in all
    kv_cache_dtype: str = "auto"  # auto (model dtype) | fp8 (half the KV bytes of bf16)
    cpu_kvcache_space_gib: float = 4.0  # CPU backend KV cache size (vLLM: VLLM_CPU_KVCACHE_SPACE)
    # The KV cache's size per rank, exactly, on any device (vLLM: kv_cache_memory_bytes); set, it
    # replaces gpu_memory_utilization's share on a GPU and cpu_kvcache_space_gib on the CPU.
    kv_cache_memory_gib: Optional[float] = None
    enable_prefix_caching: bool = False  # share KV blocks of identical prompt prefixes
    num_gpu_blocks_override: Optional[int] = None  # force the number of KV blocks (tests, debugging)
    # Schedule step N+1 while step N runs (greedy steps, TP=1); null = on for CUDA, off on CPU,
    # where the host is the device and a finished request's one extra step would only cost time.
    async_scheduling: Optional[bool] = None


@dataclass
class CompilationConfig:
    level: CompilationLevel = CompilationLevel.NO_COMPILATION
    # Decode batch sizes captured as CUDA graphs; null = 1, 2, 4, 8, then steps of 8 up to max_num_seqs (max 256).
    cudagraph_capture_sizes: Optional[List[int]] = None
    enforce_eager: bool = False  # capture no CUDA graphs: saves the graph pool, costs decode speed
    # Processes that compile the Triton kernels' variants at start-up, all at once (GPU only);
    # null = one per CPU but one (shared by a host's TP ranks), at most 16; 0 = each compiles at its first launch.
    compile_workers: Optional[int] = None
    # Hopper and later GPUs: each Triton kernel of a step is scheduled while the one before it finishes
    # (programmatic dependent launch, kept in CUDA graphs); false launches them one after another.
    programmatic_dependent_launch: bool = True


@dataclass
class MultimodalConfig:
    # Items per prompt: {image: 3, video: 1}, or {image: {count: 3, width: 1024, height: 1024}} where the
    # sizes only bound the encoder's profiling; 0 disables a modality; unnamed modalities take 1.
    limit_mm_per_prompt: Dict[str, Any] = field(default_factory=dict)
    mm_processor_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the HF processor
    mm_input_cache_gib: float = 4.0  # host cache of processed inputs (seed's name; VLLM_MM_INPUT_CACHE_GIB)
    mm_processor_cache_gib: Optional[float] = None  # vLLM's current name for the same cache; wins when set
    language_model_only: bool = False  # run a vision-language model's decoder alone (= every limit at 0)

    @property
    def processor_cache_gib(self) -> float:
        """The processed-input cache size, whichever name set it."""
        return self.mm_input_cache_gib if self.mm_processor_cache_gib is None else self.mm_processor_cache_gib


@dataclass
class LauncherConfig:
    name: str = "auto"  # auto (local for TP=1, else ray) | local (in process, TP=1) | ray (one actor per rank)
    address: Optional[str] = None  # ray: an existing cluster ("auto" or host:port); null starts one
    num_cpus_per_rank: float = 0.0  # ray: CPUs reserved per rank actor (0 lets ranks share small boxes)


@dataclass
class TaskConfig:
    name: str = "generate"  # generate | chat | bench | plan | eval | serve | save_sharded
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # one prompt per line, or JSONL with a "prompt" (and optional "images") field
    # Images (paths, file:// or data: URLs) sent with every prompt of task.prompts to a vision-language
    # model: task=chat puts them before the text; task=generate needs the prompt's own placeholders.
    images: List[str] = field(default_factory=list)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    ignore_eos: bool = False
    output_file: str = "outputs.jsonl"  # written in the run folder
    progress: bool = True
    device_memory_gib: Optional[float] = None  # plan for this GPU size instead of the one present
    # bench: a fixed synthetic workload
    num_requests: int = 64
    input_len_range: List[int] = field(default_factory=lambda: [32, 128])
    output_len_range: List[int] = field(default_factory=lambda: [32, 128])
    compare_hf: bool = True  # bench: also time HF transformers generate on the same requests
    compare_hf_requests: Optional[int] = None  # bench: HF runs only the first N requests (null = all)
    # bench: HF's API: generate (left-padded static batches) or generate_batch (its continuous
    # batching over a paged cache, attn_implementation "paged|sdpa")
    compare_hf_api: str = "generate"
    decode_batch1_tokens: int = 256  # bench on GPU: one greedy request of N tokens vs the copy roofline; 0 = skip
    runs: int = 1  # bench: the workload this many times in one process (the first run is the cold one)
    profile: bool = False  # bench on GPU: one more run under torch.profiler, device time by kind of kernel
    # eval: score each of these quantization.method values in turn, one table (empty: quantization.method alone)
    quantizations: List[str] = field(default_factory=list)
    # serve: an OpenAI-compatible HTTP server
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    api_key: Optional[str] = None  # serve: if set, /v1/*, /tokenize and /detokenize need "Authorization: Bearer KEY"
    cors_origins: List[str] = field(default_factory=list)  # serve: origins browsers may call from ("*" = any)
    max_body_bytes: int = 4194304  # serve: larger request bodies get 413
    drain_s: float = 30.0  # serve: on SIGTERM, how long in-flight requests may take to finish
    # serve: the HTTP server in a child process, so its work never holds the interpreter lock the
    # engine's host loop needs (at hundreds of streams the two in one process slow each other)
    frontend_process: bool = True
    # save_sharded
    output_dir: Optional[str] = None


@dataclass
class FrameworkConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallelism: ParallelConfig = field(default_factory=ParallelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
