"""The library entry point, used like vLLM's: `LLM(config).generate(prompts, SamplingParams(...))`,
or with vLLM's own constructor: `LLM("org/name")`, `LLM(model=..., tensor_parallel_size=2, ...)`."""
from __future__ import annotations

import logging
import time

import torch
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from framework.config.schema import FrameworkConfig
from framework.config import vllm_args
from framework.config.validate import check_before_start, read_model_config
from framework.engine.outputs import RequestOutput
from framework.engine.sampling_params import SamplingParams
from framework.loader.resolve import resolve_model_path
from framework.resolve import auto_notes, config_dict, resolve_config

if TYPE_CHECKING:
    from framework.memory.planner import MemoryPlan
    from launchers.base import Launcher
    from launchers.ray import RayLauncher

log = logging.getLogger(__name__)
Prompt = Union[str, Dict[str, Any]]


class LLM:
    def __init__(self, model: Union[None, str, FrameworkConfig] = None, **vllm_kwargs: Any):
        """`LLM(config)`, `LLM()` (the bundled model), or vLLM's `LLM("path or org/name", **kwargs)` /
        `LLM(model=..., **kwargs)`: each keyword lands on its YAML key (framework/config/vllm_args.py)."""
        begin = time.perf_counter()
        from launchers import launcher_name
        from framework.memory.measure import reset_peak_rss
        from framework.resolve import pick_device
        from kernels.precompile import release_early_workers, spawn_workers_early

        reset_peak_rss()  # this engine's peak, not an earlier job's in the same process
        requested = vllm_args.to_config(model, **vllm_kwargs)
        if launcher_name(requested) == "local":  # the engine runs here: its Triton compile workers start now
            spawn_workers_early(pick_device(requested.model.device).type, requested.compilation.compile_workers)
        try:
            self._start(requested, begin)
        finally:
            release_early_workers()  # the engine took them over, unless start-up failed

    def _start(self, requested: FrameworkConfig, begin: float) -> None:
        from launchers import reserve_ranks

        self.model_path = resolve_model_path(requested.model.path)
        # Ray: the ranks' processes start (and import for seconds) while this one checks and plans
        reserved = reserve_ranks(requested)
        try:
            self._check_plan_launch(requested, begin, reserved)
        except BaseException:
            if reserved is not None:
                reserved.shutdown()  # nothing is left behind (a no-op once the launcher has released)
            raise

    def _check_plan_launch(self, requested: FrameworkConfig, begin: float, reserved: Optional["RayLauncher"]) -> None:
        from launchers import start_launcher
        from framework.memory.planner import engine_device_memory

        self.hf_config = read_model_config(requested, self.model_path)
        check_before_start(requested, self.model_path, self.hf_config)  # before any plan, rank or weight
        checked = time.perf_counter()
        # Every `auto` becomes a value here, once; the planner, the launcher and every rank get
        # the resolved config (a CPU-only driver of a GPU cluster resolves for the CPU backend).
        gpu_here = not (requested.model.device == "cuda" and not torch.cuda.is_available())
        device_memory = engine_device_memory(requested) if gpu_here else None
        self.config = resolve_config(requested, self.hf_config, device_memory)  # a sharded folder is checked here
        for note in auto_notes(requested, self.config):
            log.info("%s", note)
        self.plan = self._plan(device_memory) if gpu_here else None
        if not gpu_here:
            log.info("no GPU in this process to plan for; see task=plan task.device_memory_gib=N")
        planned = time.perf_counter()
        self.launcher: Launcher = start_launcher(self.config, self.model_path, self.hf_config, reserved)
        # start-up by phase (task=bench prints them): the front door's own share is most of it with
        # a warm Triton cache
        self.startup_seconds = {"config": checked - begin, "plan": planned - checked,
                                "engine": time.perf_counter() - planned}

    def _plan(self, device_memory: Optional[int]) -> "MemoryPlan":
        """The memory plan, logged before any weight is read; a plan that does not fit warns
        with the overrides that would, then the run goes on (the engine has the last word)."""
        from framework.memory.fixes import format_fixes, suggest_fixes
        from framework.memory.planner import plan_memory

        plan = plan_memory(self.config, self.hf_config, device_memory)
        log.info("%s", plan.format_table())
        if not plan.fits:
            log.warning("%s", format_fixes(plan, suggest_fixes(self.config, self.hf_config, device_memory, plan)))
        return plan

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = False) -> List[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self.launcher.generate(list(prompts), sampling_params or SamplingParams(), use_tqdm)

    def score(self, windows: Sequence[List[int]]) -> List[float]:
        """Summed negative log-likelihood (nats) of each token-id window after its first token."""
        return self.launcher.score([list(w) for w in windows])

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer when the engine is in this process; else one loaded here
        (rank 0's engine lives in a Ray actor)."""
        engine = self.launcher.local_engine()
        if engine is not None:
            return engine.tokenizer
        if not hasattr(self, "_tokenizer"):
            from framework.engine.build import load_tokenizer
            self._tokenizer = load_tokenizer(self.config, self.model_path)
        return self._tokenizer

    def get_tokenizer(self) -> Any:
        """vLLM's spelling of `tokenizer`."""
        return self.tokenizer

    def apply_chat_template(self, user_message: str) -> str:
        from framework.config.errors import UserError
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"model.path={self.config.model.path!r} has no chat template; use task=generate")
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                                  add_generation_prompt=True, tokenize=False)

    def _chat_template_owner(self) -> Any:
        """The model folder's processor when it has one (a vision-language model's chat template
        lives there), else the tokenizer."""
        if not hasattr(self, "_chat_owner"):
            self._chat_owner = self.tokenizer
            if getattr(self.hf_config, "vision_config", None) is not None:
                from transformers import AutoProcessor
                self._chat_owner = AutoProcessor.from_pretrained(str(self.model_path))
        return self._chat_owner

    def chat(self, messages: Sequence[Any], sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = False) -> List[RequestOutput]:
        """One conversation (a list of {role, content} messages) or a list of them, content as a
        string or OpenAI-style parts (text, image_url with a data: URL / path / file://, image,
        video frames). A conversation that cannot be read fails alone, with its error."""
        from framework.engine.outputs import CompletionOutput
        from framework.multimodal.chat import split_chat_messages
        from framework.multimodal.limits import MultimodalInputError
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        owner = self._chat_template_owner()
        prompts: List[Any] = []
        for i, conversation in enumerate(conversations):
            try:
                template, media = split_chat_messages(conversation)
                text = owner.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
                prompts.append({"prompt": text, "multi_modal_data": media} if media else text)
            except (MultimodalInputError, ValueError) as exc:
                prompts.append(RequestOutput(f"chat-{i}", None, [], [CompletionOutput("", [], "error")],
                                             error=f"conversation {i}: {exc}"))
        params = sampling_params or SamplingParams()
        good = [i for i, p in enumerate(prompts) if not isinstance(p, RequestOutput)]
        if isinstance(params, (list, tuple)):
            params = [params[i] for i in good]
        outputs = self.generate([prompts[i] for i in good], params, use_tqdm) if good else []
        for i, out in zip(good, outputs):
            prompts[i] = out
        return prompts

    def stats(self) -> Dict[str, Any]:
        """Load time, KV cache size and measured memory of each rank, and the resolved config
        they ran (for metrics.json)."""
        return {**self.launcher.stats(), "resolved_config": config_dict(self.config)}

    def shutdown(self) -> None:
        self.launcher.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
