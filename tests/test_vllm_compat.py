"""A vLLM script runs with one changed import: vLLM's constructor keywords land on our YAML keys,
hub ids resolve from the local HF cache, and every example of SEED.md is a recipe with the same
effect. The supported examples run on tiny random models placed in a fake HF cache."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from framework import compose
from framework.config import CompilationConfig, CompilationLevel, CompilationMode, ConfigError, FrameworkConfig
from framework.config.vllm_args import KEYS, to_config
from helpers import hf_greedy

REPO = Path(__file__).resolve().parents[1]

# Every example of ../shared/SEED.md: recipe -> the keywords it passes to vLLM's LLM(...).
SEED_EXAMPLES = {
    "seed_tp2": dict(model="ibm-granite/granite-3.1-8b-instruct", tensor_parallel_size=2),
    "seed_context_batch": dict(model="adept/fuyu-8b", max_model_len=2048, max_num_seqs=2),
    "seed_cudagraph_sizes": dict(model="meta-llama/Llama-3.1-8B-Instruct", compilation_config=CompilationConfig(
        level=CompilationLevel.PIECEWISE, cudagraph_capture_sizes=[1, 2, 4, 8, 16])),
    "seed_enforce_eager": dict(model="meta-llama/Llama-3.1-8B-Instruct", enforce_eager=True),
    "seed_mm_limits": dict(model="Qwen/Qwen2.5-VL-3B-Instruct", limit_mm_per_prompt={"image": 3, "video": 1}),
    "seed_no_video": dict(model="Qwen/Qwen2.5-VL-3B-Instruct", limit_mm_per_prompt={"video": 0}),
    "seed_text_only": dict(model="google/gemma-3-27b-it", limit_mm_per_prompt={"image": 0}),
    "seed_max_pixels": dict(model="Qwen/Qwen2.5-VL-3B-Instruct", mm_processor_kwargs={"max_pixels": 768 * 768}),
    "seed_max_dynamic_patch": dict(model="OpenGVLab/InternVL2-2B", mm_processor_kwargs={"max_dynamic_patch": 4}),
}


def without_task(cfg: FrameworkConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("task")
    return out


def test_every_seed_example_is_a_recipe_with_the_same_effect():
    recipes = sorted(p.stem for p in (REPO / "recipes").glob("seed_*.yaml"))
    assert recipes == sorted(SEED_EXAMPLES)
    for recipe, kwargs in SEED_EXAMPLES.items():
        assert without_task(compose([f"+recipe={recipe}"])) == without_task(to_config(**kwargs)), recipe


@pytest.mark.parametrize("keyword, value, key, expected", [
    ("tensor_parallel_size", 2, "parallelism.tensor_parallel_size", 2),
    ("quantization", "int8", "quantization.method", "int8"),
    ("quantization", "compressed-tensors", "quantization.method", "auto"),
    ("dtype", "half", "model.dtype", "float16"),
    ("dtype", "bfloat16", "model.dtype", "bfloat16"),
    ("max_model_len", 2048, "cache.max_model_len", 2048),
    ("max_num_seqs", 2, "cache.max_num_seqs", 2),
    ("max_num_batched_tokens", 512, "cache.max_num_batched_tokens", 512),
    ("gpu_memory_utilization", 0.5, "cache.gpu_memory_utilization", 0.5),
    ("block_size", 32, "cache.block_size", 32),
    ("kv_cache_dtype", "fp8", "cache.kv_cache_dtype", "fp8"),
    ("enable_prefix_caching", True, "cache.enable_prefix_caching", True),
    ("num_gpu_blocks_override", 64, "cache.num_gpu_blocks_override", 64),
    ("kv_cache_memory_bytes", 3 << 29, "cache.kv_cache_memory_gib", 1.5),
    ("enforce_eager", True, "compilation.enforce_eager", True),
    ("disable_custom_all_reduce", True, "parallelism.custom_all_reduce", False),
    ("limit_mm_per_prompt", {"image": 2, "video": 0}, "multimodal.limit_mm_per_prompt", {"image": 2, "video": 0}),
    ("limit_mm_per_prompt", {"image": {"count": 3, "width": 512}}, "multimodal.limit_mm_per_prompt", {"image": 3}),
    ("mm_processor_kwargs", {"max_pixels": 1000}, "multimodal.mm_processor_kwargs", {"max_pixels": 1000}),
    ("mm_processor_cache_gb", 1.5, "multimodal.mm_input_cache_gib", 1.5),
    ("seed", 7, "model.seed", 7),
    ("load_format", "dummy", "model.load_format", "dummy"),
    ("load_format", "sharded_state", "model.load_format", "sharded"),
    ("distributed_executor_backend", "ray", "launcher.name", "ray"),
    ("language_model_only", True, "multimodal.limit_mm_per_prompt", {"image": 0, "video": 0, "audio": 0}),
])
def test_keyword_lands_on_its_yaml_key(keyword, value, key, expected):
    cfg = to_config("some/model", **{keyword: value})
    group, name = key.split(".")
    assert getattr(getattr(cfg, group), name) == expected


def test_defaults_follow_vllm_and_none_keeps_them(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = to_config(model="some/model", max_model_len=None, seed=None, quantization=None)
    assert cfg.model.path == "some/model" and cfg.model.seed == 0 and cfg.cache.max_model_len is None
    assert cfg.quantization.method == "auto"  # vLLM reads a checkpoint's quantization_config by default
    given = FrameworkConfig()
    assert to_config(given) is given  # LLM(config) takes the config as it is
    changed = to_config(given, max_num_seqs=3)
    assert changed.cache.max_num_seqs == 3 and given.cache.max_num_seqs == 256  # a copy, not the caller's


def test_compilation_config_forms():
    piecewise = to_config("m", compilation_config=CompilationConfig(
        level=CompilationLevel.PIECEWISE, cudagraph_capture_sizes=[1, 2, 4, 8, 16])).compilation
    assert piecewise.level == CompilationLevel.PIECEWISE and piecewise.cudagraph_capture_sizes == [1, 2, 4, 8, 16]
    assert to_config("m", compilation_config={"level": 3}).compilation.level == 3
    assert to_config("m", compilation_config=2).compilation.level == CompilationLevel.DYNAMO_ONCE
    mode = to_config("m", compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE)).compilation
    assert mode.level == CompilationLevel.PIECEWISE
    assert to_config("m", compilation_config={"mode": "NONE"}).compilation.level == 0
    capped = to_config("m", compilation_config={"max_cudagraph_capture_size": 20}).compilation
    assert capped.cudagraph_capture_sizes == [1, 2, 4, 8, 16]
    assert to_config("m", compilation_config={"cudagraph_mode": "NONE"}).compilation.enforce_eager
    # enforce_eager=True wins whichever keyword comes first
    assert to_config("m", enforce_eager=True, compilation_config=3).compilation.enforce_eager
    # a vLLM CompilationConfig is one of ours: a hand-built FrameworkConfig takes it too
    cfg = FrameworkConfig(compilation=CompilationConfig(mode=CompilationMode.VLLM_COMPILE))
    assert cfg.compilation.level == CompilationLevel.PIECEWISE


@pytest.mark.parametrize("kwargs, start", [
    (dict(swap_space=4), "swap_space=4: not supported: a preempted request is recomputed here"),
    (dict(cpu_offload_gb=8), "cpu_offload_gb=8: not supported: weights are never offloaded to host memory here; "
                             "to fit them use quantization=fp8 or int4, or tensor_parallel_size=N"),
    (dict(kv_offloading_size=16), "kv_offloading_size=16: not supported: there is no host tier"),
    (dict(enable_sleep_mode=True), "enable_sleep_mode=True: not supported: there is no sleep mode here"),
    (dict(max_num_sequences=8), "max_num_sequences=8: not a keyword this framework has a knob for"),
    (dict(max_num_seq=8), "max_num_seq=8: not a keyword this framework has a knob for; did you mean max_num_seqs?"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size=0: must be a positive integer"),
    (dict(quantization="awq"), "quantization='awq': must be one of none, fp8"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization=1.5: must be in (0, 1]"),
    (dict(compilation_config={"level": 9}), "compilation_config.level=9: must be one of NO_COMPILATION (0)"),
    (dict(compilation_config={"splitting_ops": []}), "compilation_config.splitting_ops=[]: not a field"),
    (dict(compilation_config={"cudagraph_mode": "PIECEWISE"}), "compilation_config.cudagraph_mode='PIECEWISE'"),
    (dict(limit_mm_per_prompt={"imag": 1}), "limit_mm_per_prompt.imag=1: unknown modality"),
    (dict(distributed_executor_backend="mp"), "distributed_executor_backend='mp': must be None, 'ray' or 'uni'"),
    (dict(enforce_eager="yes"), "enforce_eager='yes': must be True or False"),
    (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization='0.5': must be a number"),
    (dict(kv_cache_memory_bytes="4GiB"), "kv_cache_memory_bytes='4GiB': must be a number"),
    (dict(kv_cache_memory_bytes=0), "kv_cache_memory_bytes=0: must be a number of bytes > 0"),
])
def test_bad_keyword_is_one_line_naming_it(kwargs, start):
    with pytest.raises(ConfigError) as err:
        to_config("m", **kwargs)
    message = str(err.value)
    assert message.startswith(start) or message.startswith("multimodal." + start), message
    assert "\n" not in message and "None:" not in message


def test_vllm_env_vars(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")
    monkeypatch.setenv("VLLM_MM_INPUT_CACHE_GIB", "1")
    cfg = to_config("m")
    assert cfg.cache.cpu_kvcache_space_gib == 0.25 and cfg.multimodal.mm_input_cache_gib == 1.0
    assert compose().cache.cpu_kvcache_space_gib == 0.25  # the CLI reads the same variable
    assert to_config("m", mm_processor_cache_gb=0).multimodal.mm_input_cache_gib == 0  # a keyword wins
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(ConfigError, match=r"^VLLM_CPU_KVCACHE_SPACE='lots': must be a number of GiB"):
        to_config("m")


def fake_hub_cache(root: Path, repos: dict) -> Path:
    """HF's cache layout (models--org--name/snapshots/REV, refs/main) holding local folders."""
    for repo_id, folder in repos.items():
        entry = root / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, entry / "snapshots" / ("0" * 40))
        (entry / "refs").mkdir(parents=True, exist_ok=True)
        (entry / "refs" / "main").write_text("0" * 40)
    return root


def test_hub_id_resolves_offline_from_the_hf_cache(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    from framework.config.errors import UserError
    from framework.loader.resolve import resolve_model_path
    from framework.loader.resolve import load_hf_config
    from framework.resolve import resolve_config
    from helpers import small_config
    with_tokenizer = Path(shutil.copytree(tiny_model("llama"), tmp_path / "tok"))
    write_tokenizer(with_tokenizer)
    cache = fake_hub_cache(tmp_path / "hub", {"org/tiny-llama": with_tokenizer, "org/no-tokenizer": tiny_model("llama")})
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE sets at import
    assert (resolve_model_path("org/tiny-llama") / "config.json").is_file()
    assert Path(to_config("m", tokenizer="org/tiny-llama").model.tokenizer) == resolve_model_path("org/tiny-llama")
    with pytest.raises(ConfigError, match=r"^tokenizer='org/absent': no tokenizer found: no such folder, and not in "
                                          r"the HF hub cache"):
        to_config("m", tokenizer="org/absent")
    # The YAML key resolves the same way, once, in resolve_config; set and absent is never ignored.
    cfg, hf = small_config(tiny_model("llama")), load_hf_config(tiny_model("llama"))
    cfg.model.tokenizer = "org/tiny-llama"
    assert Path(resolve_config(cfg, hf, None).model.tokenizer) == resolve_model_path("org/tiny-llama")
    for absent in ("org/no-tokenizer", str(tmp_path)):
        cfg.model.tokenizer = absent
        with pytest.raises(ConfigError, match=rf"^model.tokenizer='{absent}': no tokenizer found"):
            resolve_config(cfg, hf, None)
    with pytest.raises(UserError, match=r"^model.path='org/absent': no config.json found; .*HF hub cache"):
        resolve_model_path("org/absent")


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny model's vocabulary, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 384)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(folder)


# SEED.md's code with only the import changed, then one greedy generate printed as JSON.
SCRIPT = """
import json
from framework import LLM, SamplingParams
from framework.config import CompilationConfig, CompilationLevel
{example}
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
out = llm.generate([{{"prompt_token_ids": [1, 5, 7, 9, 11]}}], params)
print("TOKENS", json.dumps(out[0].token_ids))
llm.shutdown()
"""
EXAMPLES = {
    "seed_cudagraph_sizes": """
llm = LLM(
    model="meta-llama/Llama-3.1-8B-Instruct",
    compilation_config=CompilationConfig(
        level=CompilationLevel.PIECEWISE,
        # by default it goes up to max_num_seqs
        cudagraph_capture_sizes=[1, 2, 4, 8, 16],
    ),
)""",
    "seed_enforce_eager": """
llm = LLM(model="meta-llama/Llama-3.1-8B-Instruct",
          enforce_eager=True)""",
    "seed_tp2": """
llm = LLM(model="ibm-granite/granite-3.1-8b-instruct",
          tensor_parallel_size=2)""",
}


@pytest.fixture(scope="module")
def seed_hub(tmp_path_factory):
    """Tiny random Llama and Granite checkpoints under the SEED's hub ids, in a fake HF cache."""
    from helpers import build_tiny_model
    root = tmp_path_factory.mktemp("seed")
    llama = build_tiny_model(root / "llama", "llama")
    granite = build_tiny_model(root / "granite", "granite")
    for folder in (llama, granite):
        write_tokenizer(folder)
    return fake_hub_cache(root / "hub", {"meta-llama/Llama-3.1-8B-Instruct": llama,
                                         "ibm-granite/granite-3.1-8b-instruct": granite}), {"llama": llama,
                                                                                            "granite": granite}


def run_example(name: str, hub: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPT.format(example=textwrap.dedent(EXAMPLES[name])))
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "0.05",
           "CUDA_VISIBLE_DEVICES": "",  # the CPU backend, matching HF in float32 (GPU: the test below)
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def tokens_of(proc: subprocess.CompletedProcess) -> list:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")][-1]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("name", ["seed_cudagraph_sizes", "seed_enforce_eager"])
def test_seed_example_runs_with_the_import_changed(name, seed_hub, tmp_path):
    hub, folders = seed_hub
    proc = run_example(name, hub, tmp_path)
    assert tokens_of(proc) == hf_greedy(folders["llama"], [[1, 5, 7, 9, 11]], max_tokens=6)[0]
    if name == "seed_cudagraph_sizes":  # on CPU the compilation knobs do nothing: said once, at start
        assert "compilation.level=PIECEWISE" in proc.stderr and "not used on the CPU backend" in proc.stderr


@pytest.mark.slow
def test_seed_tensor_parallel_example(seed_hub, tmp_path):
    hub, folders = seed_hub
    proc = run_example("seed_tp2", hub, tmp_path)
    assert tokens_of(proc) == hf_greedy(folders["granite"], [[1, 5, 7, 9, 11]], max_tokens=6)[0]


def config_only_folders(root: Path) -> dict:
    """config.json of each multimodal model of the SEED examples (no weights): enough to map, plan
    and accept or refuse them."""
    import transformers as tf
    folders = {"Qwen/Qwen2.5-VL-3B-Instruct": REPO / "framework" / "assets" / "shapes" / "qwen2.5-vl-3b"}
    gemma = tf.Gemma3Config(architectures=["Gemma3ForConditionalGeneration"])
    fuyu = tf.FuyuConfig(architectures=["FuyuForCausalLM"])
    for repo_id, config in (("google/gemma-3-27b-it", gemma), ("adept/fuyu-8b", fuyu)):
        config.save_pretrained(root / repo_id)
        folders[repo_id] = root / repo_id
    from tests.internvl_helpers import INTERNVL2_2B_CHAT_CONFIG
    internvl = root / "OpenGVLab" / "InternVL2-2B"  # its own layout (internvl_chat), read natively
    internvl.mkdir(parents=True)
    (internvl / "config.json").write_text(json.dumps(INTERNVL2_2B_CHAT_CONFIG))
    folders["OpenGVLab/InternVL2-2B"] = internvl
    return folders


@pytest.mark.parametrize("name", ["seed_context_batch", "seed_mm_limits", "seed_no_video", "seed_text_only",
                                  "seed_max_pixels", "seed_max_dynamic_patch"])
def test_multimodal_seed_example_is_accepted_or_refused_clearly(name, tmp_path, monkeypatch):
    """Multimodal models are being built elsewhere: until one is registered its example is one
    line naming the architecture (or the foreign model type), before any plan or rank; once it
    is, the engine starts with the example's knobs."""
    import huggingface_hub.constants as hub
    import launchers
    from framework.config.errors import UserError
    from framework.llm import LLM
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", config_only_folders(tmp_path))))
    started = []
    monkeypatch.setattr(launchers, "start_launcher", lambda cfg, *a: started.append(cfg))
    kwargs = SEED_EXAMPLES[name]
    try:
        LLM(**kwargs)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and not started
        assert name != "seed_max_dynamic_patch", message  # InternVL2-2B's own layout runs (models/internvl_chat.py)
        assert "is not supported" in message or "not supported yet" in message \
            or "model_type 'internvl_chat'" in message, message
        return
    (cfg,) = started  # resolved: the example's knobs, every auto a value
    expected = to_config(**kwargs)
    for section in ("model", "parallelism", "multimodal"):
        assert getattr(cfg, section) == getattr(expected, section)
    for key in ("max_model_len", "max_num_seqs"):
        if isinstance(getattr(expected.cache, key), int):
            assert getattr(cfg.cache, key) == getattr(expected.cache, key)


@pytest.mark.gpu
@pytest.mark.parametrize("compilation", ["seed_cudagraph_sizes", "seed_enforce_eager"])
def test_seed_compilation_examples_on_gpu(compilation, tiny_model, tmp_path, monkeypatch):
    """The SEED's CUDA-graph examples through vLLM's keywords on a GPU: the graphs captured are the
    sizes asked for (none with enforce_eager), and greedy tokens match HF in float32."""
    import huggingface_hub.constants as hub
    from framework import SamplingParams
    from framework.llm import LLM
    from helpers import PROMPTS
    model_dir = tiny_model("llama3")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path, {"meta-llama/Llama-3.1-8B-Instruct":
                                                                          model_dir})))
    example = {k: v for k, v in SEED_EXAMPLES[compilation].items()}
    with LLM(**example, dtype="float32", max_model_len=256, max_num_seqs=16, gpu_memory_utilization=0.5) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        stats = llm.stats()["ranks"][0]
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, PROMPTS, max_tokens=8)
    if compilation == "seed_enforce_eager":
        assert stats["cudagraph_sizes"] == [] and stats["compilation_level"] == "NO_COMPILATION"
    else:
        assert stats["cudagraph_sizes"] == [1, 2, 4, 8, 16] and stats["compilation_level"] == "PIECEWISE"


def test_get_tokenizer_is_vllms_spelling():
    from framework.llm import LLM
    with LLM(max_num_seqs=2) as llm:
        assert llm.get_tokenizer() is llm.tokenizer and llm.get_tokenizer().encode("def") 
