"""The engine loop: admit requests, schedule a step, run the model, sample, detokenize.

It lives on rank 0. A request it cannot serve (empty, too long, bad token ids or settings)
finishes at once with an error; it never reaches the scheduler, so no other request is hurt.
A failure inside a step (the forward, or one row's sampling) fails the requests of that step
(or that row) with an error; the engine goes on with the others.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence as Seq, Union

import torch
import torch.nn.functional as F

from framework.config.errors import UserError
from framework.config.schema import FrameworkConfig
from framework.engine.block_manager import BlockManager, window_blocks_per_request
from framework.engine.detokenizer import IncrementalDecoder
from framework.engine.model_runner import ModelRunner
from framework.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from framework.engine.sampler import SampleRow, Sampled, sample
from framework.engine.sampling_params import SamplingParams
from framework.engine.scheduler import ScheduledBatch, Scheduler
from framework.engine.sequence import Sequence, Status
from framework.engine.step_input import build_step_input
from framework.engine.step_log import StepLog, record_of
from framework.multimodal.encoder_cache import EncoderCache
from framework.multimodal.limits import MultimodalInputError
from framework.multimodal.processor import MultimodalProcessor, MultimodalPrompt

log = logging.getLogger(__name__)
Prompt = Union[str, Dict[str, Any]]


@dataclass
class LaunchedStep:
    batch: ScheduledBatch
    sampling: List[Sequence]  # the sequences that sample a token this step, in logits-row order
    logits: Optional[torch.Tensor] = None  # sampled on the host at resolution (a non-greedy row, or sync mode)
    # async scheduling: the greedy tokens, copied to the host without blocking (the step's
    # resolution may wait for the next launch), readable once `ready` fires (None on the CPU)
    tokens_host: Optional[torch.Tensor] = None
    ready: Optional[torch.cuda.Event] = None


def request_problem(token_ids: List[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> Optional[str]:
    """Why an engine of this context length and vocabulary would refuse the request, or None."""
    if not token_ids:
        return "the prompt is empty"
    if len(token_ids) >= max_model_len:
        return (f"the prompt has {len(token_ids)} tokens; cache.max_model_len={max_model_len} "
                "leaves no room to generate")
    bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        return f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
    if not isinstance(params, SamplingParams):
        return f"sampling params must be a SamplingParams, got {type(params).__name__}"
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        return f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab_size})"
    return params.problem()


class LLMEngine:
    def __init__(self, cfg: FrameworkConfig, runner: ModelRunner, tokenizer: Any, eos_token_ids: Seq[int],
                 mm_processor: Optional[MultimodalProcessor] = None, encoder_budget: int = 0):
        """`cfg` resolved (framework/resolve.py): max_model_len and max_num_seqs are numbers.
        A multimodal model brings its processor and its encoder cache budget (embedding tokens)."""
        self.cfg, self.runner, self.tokenizer = cfg, runner, tokenizer
        self.mm_processor = mm_processor
        max_model_len, max_num_seqs = cfg.cache.max_model_len, cfg.cache.max_num_seqs
        self.max_model_len, self.eos_token_ids = max_model_len, set(eos_token_ids)
        self.vocab_size = runner.model.vocab_size
        self.block_size = cfg.cache.block_size
        num_blocks = runner.num_blocks_that_fit()
        spec = runner.kv_spec
        window_blocks = runner.num_window_blocks  # the sliding-window layers' pool (0: no such group)
        if not cfg.cache.enable_prefix_caching:  # never hold more than full concurrency can use
            num_blocks = min(num_blocks, max_num_seqs * -(-max_model_len // self.block_size))
            if spec.num_window_layers:
                window_blocks = min(window_blocks, max_num_seqs * window_blocks_per_request(
                    self.block_size, spec.sliding_window, max_model_len) + -(-cfg.cache.max_num_batched_tokens
                                                                             // self.block_size))
        num_blocks = max(0, num_blocks)
        if num_blocks * self.block_size < max_model_len:
            raise UserError(runner.kv_shortfall(num_blocks * self.block_size, max_model_len))
        window_need = min(-(-max_model_len // self.block_size),
                          window_blocks_per_request(self.block_size, spec.sliding_window, max_model_len))
        if spec.num_window_layers and window_blocks < window_need:
            raise UserError(f"the sliding-window layers' KV pool has {window_blocks} blocks, fewer than the "
                            f"{window_need} one request's window needs; raise cache.num_gpu_blocks_override "
                            f"(it sizes both pools) or the memory for the KV cache")
        runner.allocate_kv_cache(num_blocks, window_blocks)
        log.info("KV cache: %d blocks x %d tokens = %d tokens; %.1f requests of %d tokens at once%s",
                 num_blocks, self.block_size, num_blocks * self.block_size,
                 num_blocks * self.block_size / max_model_len, max_model_len,
                 f"; sliding-window layers: {window_blocks} blocks of their own, freed as the window "
                 f"({spec.sliding_window} tokens) passes" if spec.num_window_layers else "")
        self.block_manager = BlockManager(num_blocks, self.block_size, cfg.cache.enable_prefix_caching,
                                          window_blocks, spec.sliding_window if spec.num_window_layers else 0)
        self.encoder_cache = EncoderCache(encoder_budget) if mm_processor is not None else None
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, cfg.cache.max_num_batched_tokens,
                                   self.encoder_cache)
        self.generator = torch.Generator().manual_seed(cfg.model.seed)
        self._ids = itertools.count()
        self.num_generated_tokens = 0
        self.errors: Dict[int, str] = {}  # seq_id -> why a step failed it, until its output is taken
        self.logprobs: Dict[int, List[TokenLogprob]] = {}  # seq_id -> per token, for requests that ask
        self._stop_decoders: Dict[int, IncrementalDecoder] = {}  # seq_id -> its text so far, for stop strings
        self.forks: Dict[int, List[Sequence]] = {}  # seq_id -> samples of its prompt waiting for its KV
        self.pending: Optional[LaunchedStep] = None  # async scheduling: launched, not yet resolved
        self.step_log: Optional[StepLog] = None  # task=bench sets it: what each step computed (step_log.py)
        pin = runner.device.type == "cuda"
        self._host_tokens = [torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._flip = 0

    # --- requests ---------------------------------------------------------------------
    def _tokenize(self, prompt: Prompt) -> tuple[Optional[str], List[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer; pass {'prompt_token_ids': [...]}")
        return prompt, self.tokenizer.encode(prompt)

    def _problem(self, token_ids: List[int], params: SamplingParams) -> Optional[str]:
        return request_problem(token_ids, params, self.max_model_len, self.vocab_size)

    def _multimodal(self, prompt: Prompt, text: Optional[str], token_ids: List[int]) -> MultimodalPrompt:
        """The prompt's images and videos processed, placeholders expanded (a text-only prompt of a
        multimodal model too: a stray placeholder without its item is refused)."""
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        kwargs = prompt.get("mm_processor_kwargs") if isinstance(prompt, dict) else None
        if self.mm_processor is None:
            if data or kwargs:
                raise MultimodalInputError("this model takes no images or videos (multi_modal_data)")
            return MultimodalPrompt(token_ids)
        out = prompt.get("processed") if isinstance(prompt, dict) else None
        if out is None:  # the server processes in its worker threads (and hands the result over)
            out = self.mm_processor.process(token_ids, data, kwargs)
        too_big = [p.item for p in out.items if p.item.num_tokens > self.encoder_cache.budget_tokens]
        if too_big:
            raise MultimodalInputError(f"an {too_big[0].modality} of {too_big[0].num_tokens} tokens exceeds the "
                                       f"encoder cache budget of {self.encoder_cache.budget_tokens} tokens; lower "
                                       "mm_processor_kwargs.max_pixels (Fuyu: mm_processor_kwargs.size; Gemma-3: "
                                       "pan_and_scan_max_num_crops) or raise cache.max_num_batched_tokens")
        if getattr(self.runner.model, "bidirectional_mm_run_tokens", 0):
            longest = max((b - a for p in out.items for a, b in p.item.runs()), default=0)
            if longest > self.cfg.cache.max_num_batched_tokens:  # it must be computed in one prefill chunk
                raise MultimodalInputError(f"an image run of {longest} tokens attends to itself both ways and must "
                                           "be computed in one prefill chunk; cache.max_num_batched_tokens="
                                           f"{self.cfg.cache.max_num_batched_tokens} is smaller")
        return out

    def request_problem(self, token_ids: List[int], params: SamplingParams) -> Optional[str]:
        """Why add_request would refuse these token ids and settings, or None (any thread: it
        reads only what never changes)."""
        return self._problem(token_ids, params)

    def add_request(self, prompt: Prompt, params: SamplingParams) -> Union[Sequence, RequestOutput]:
        """A Sequence now in the scheduler, or a finished RequestOutput carrying the error."""
        seq = self._new_sequence(prompt, params)
        if isinstance(seq, Sequence):
            self.scheduler.add(seq)
        return seq

    def add_request_group(self, prompt: Prompt, params: Seq[SamplingParams]) -> List[Union[Sequence, RequestOutput]]:
        """Several samples of one prompt (OpenAI's `n`). The first computes the prompt; the others
        wait until it has, then take references to its full prompt blocks and compute only the
        rest (at most a block), so the prompt's KV is computed and held once."""
        first = self.add_request(prompt, params[0])
        others = [self._new_sequence(prompt, p) for p in params[1:]]
        if isinstance(first, Sequence):
            self.forks[first.seq_id] = [s for s in others if isinstance(s, Sequence)]
        else:
            for seq in others:
                if isinstance(seq, Sequence):
                    self.scheduler.add(seq)
        return [first, *others]

    def _new_sequence(self, prompt: Prompt, params: SamplingParams) -> Union[Sequence, RequestOutput]:
        request_id = str(next(self._ids))
        text, token_ids = None, []
        mm = MultimodalPrompt([])
        try:
            text, token_ids = self._tokenize(prompt)
            mm = self._multimodal(prompt, text, token_ids)
            token_ids = mm.token_ids
            problem = self._problem(token_ids, params)
        except MultimodalInputError as exc:  # one line naming the item or limit at fault
            text, token_ids, problem = (prompt.get("prompt") if isinstance(prompt, dict) else prompt), [], str(exc)
        except Exception as exc:  # a bad prompt or tokenizer failure is this request's problem only
            problem = f"could not read the prompt: {type(exc).__name__}: {exc}"
        if problem:
            return RequestOutput(request_id, text, token_ids, [CompletionOutput("", [], "error")],
                                 error=f"request {request_id}: {problem}", refused=True)
        seq = Sequence(token_ids, params, request_id=request_id, prompt=text)
        if mm.items:
            seq.mm_items = mm.items
            if getattr(self.runner.model, "bidirectional_mm_run_tokens", 0):
                seq.bidirectional_runs = [(p.offset + a, p.offset + b) for p in mm.items for a, b in p.item.runs()]
            if getattr(self.runner.model, "uses_mrope", False):
                seq.mrope_positions, seq.mrope_delta = self.runner.model.mrope_positions(
                    len(token_ids), [(p.offset, p.item.modality, p.item.data) for p in mm.items])
        return seq

    # --- the loop -------------------------------------------------------------------
    # A step is launched (forward and, for greedy rows, argmax on the device), committed (its
    # sequences advance, each sampled token enters as a placeholder -(row+1)), then resolved
    # (placeholders become tokens, finished sequences leave). With async scheduling a greedy
    # step's resolution waits until the next step has been launched: the host schedules step N+1
    # while the device still runs step N, and N+1 reads N's tokens on the device (see
    # step_tensors.fill_sampled). A sequence that finishes in N has computed one row in N+1
    # that is thrown away.
    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.pending is not None

    def gauges(self) -> Dict[str, int]:
        """Requests running and waiting, KV blocks free and in all, preemptions (for /metrics;
        plain reads, harmless from another thread)."""
        s, b = self.scheduler, self.block_manager
        return {"running": len(s.running), "waiting": len(s.waiting), "free_blocks": b.num_free_blocks,
                "num_blocks": b.num_blocks, "preemptions": s.num_preemptions}

    def step(self) -> List[Sequence]:
        """One scheduler step; returns the sequences that finished in it (failed ones too)."""
        finished: List[Sequence] = []
        try:
            batch = self.scheduler.schedule()
        except Exception as exc:  # no step can be formed: fail every request, keep the engine
            log.exception("scheduling failed")
            batch = ScheduledBatch([], [])
            finished += self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), exc)
        launched = None
        if batch.seqs:
            try:
                launched = self._launch(batch)
            except Exception as exc:  # the forward failed: the requests in it fail, the rest go on
                log.exception("a step's forward failed")
                for key, _, _ in batch.mm_encode:  # never stored by the runner: not held
                    self.encoder_cache.discard(key)
                finished += self._fail(batch.seqs, exc)
        if self.pending is not None:
            finished += self._resolve_or_fail(self.pending)
        self.pending = None
        if launched is not None:
            self._commit(launched)
            if launched.tokens_host is not None:
                self.pending = launched
            else:
                finished += self._resolve_or_fail(launched)
        return finished

    def _resolve_or_fail(self, launched: LaunchedStep) -> List[Sequence]:
        try:
            return self._resolve(launched)
        except Exception as exc:
            log.exception("a step's sampling failed")
            return self._fail([s for s in launched.sampling if not s.is_finished], exc)

    def _fail(self, seqs: List[Sequence], exc: Union[Exception, str]) -> List[Sequence]:
        """Finish `seqs` with an error; returns the ones that were still unfinished."""
        failed = []
        message = exc if isinstance(exc, str) else f"the engine step failed: {type(exc).__name__}: {exc}"
        for seq in seqs:
            if seq.is_finished:
                continue
            self.abort(seq)
            seq.finish_reason, seq.finish_time = "error", time.perf_counter()
            self.errors[seq.seq_id] = f"request {seq.request_id}: {message}"
            failed.append(seq)
        return failed

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        step = build_step_input(batch, self.block_size)
        sampling = [seq for seq, n in zip(batch.seqs, batch.num_new_tokens)
                    if seq.num_computed_tokens + n == seq.num_tokens]  # reached the newest token
        greedy = self.runner.async_scheduling and all(s.params.plain_greedy for s in sampling)
        step.greedy_rows = len(sampling) if greedy else 0  # the runner's argmax, on every rank
        logits = self.runner.run(step, keep_on_device=True)  # only sampled tokens come back to the host
        if not greedy:
            self._log_step(batch, len(sampling))
            return LaunchedStep(batch, sampling, logits=logits)
        tokens = self.runner.sampled[:len(sampling)]
        self._flip ^= 1  # two host buffers: the pending step's tokens are still to be read from the other
        host = self._host_tokens[self._flip][:len(sampling)]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event() if tokens.is_cuda else None
        if ready is not None:
            ready.record()
        self._log_step(batch, len(sampling))
        return LaunchedStep(batch, sampling, tokens_host=host, ready=ready)

    def _log_step(self, batch: ScheduledBatch, logits_rows: int) -> None:
        if self.step_log is not None:
            self.step_log.add(record_of(batch, logits_rows, self.runner.last_graphed))

    def _commit(self, launched: LaunchedStep) -> None:
        batch = launched.batch
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # finished in the step before, which resolved after this one launched
                continue
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)  # placeholders are never among the computed tokens
            self.scheduler.release_encoder_inputs(seq)
            if seq.seq_id in self.forks and seq.num_computed_tokens >= self._shared_blocks(seq) * self.block_size:
                self._attach_forks(seq)
        for row, seq in enumerate(launched.sampling):
            if not seq.is_finished:
                seq.token_ids.append(-1 - row)

    def _resolve(self, launched: LaunchedStep) -> List[Sequence]:
        seqs = launched.sampling
        if launched.tokens_host is not None:
            if launched.ready is not None:
                launched.ready.synchronize()
            sampled = [Sampled(t) for t in launched.tokens_host.tolist()]
        else:
            sampled = sample(launched.logits, [self._sample_row(s) for s in seqs], self.generator)
        finished = []
        now = time.perf_counter()
        for seq, result in zip(seqs, sampled):
            if seq.is_finished:
                continue
            if result.error is not None:
                finished += self._fail([seq], result.error)
                continue
            token = result.token
            seq.token_ids[-1] = token  # its placeholder: nothing is appended between commit and resolve
            if seq.params.logprobs is not None:
                self.logprobs.setdefault(seq.seq_id, []).append(TokenLogprob(token, result.logprob, result.top))
            seq.first_token_time = seq.first_token_time or now
            self.num_generated_tokens += 1
            reason = self._finish_reason(seq, token)
            if reason:
                seq.finish_time = now
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        outputs = seq.token_ids[seq.num_prompt_tokens:-1]  # the last one is this step's placeholder
        banned = ()
        if len(outputs) < p.min_tokens:
            banned = sorted(set(p.stop_token_ids) | self.eos_token_ids)
        return SampleRow(p, seq.generator, seq.token_ids[:seq.num_prompt_tokens], outputs, banned)

    def _shared_blocks(self, seq: Sequence) -> int:
        """Full blocks of prompt a sample can share, leaving it at least one token to compute."""
        return (seq.num_prompt_tokens - 1) // self.block_size

    def _attach_forks(self, parent: Sequence) -> None:
        """The parent's prompt KV is written (the steps that wrote it run before any later step on
        the device): its samples take references to its full prompt blocks and join the queue."""
        shared = min(self._shared_blocks(parent), len(parent.block_table))
        for seq in self.forks.pop(parent.seq_id, []):
            self.block_manager.share_prefix(parent, seq, shared)  # full blocks are never written again
            seq.num_computed_tokens = shared * self.block_size
            self.scheduler.add(seq)

    def _release_forks(self, parent: Sequence) -> None:
        """The parent ends before its prompt was computed: its samples compute their own."""
        for seq in self.forks.pop(parent.seq_id, []):
            self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop one unfinished request (its client went away); a step in flight skips it, as it
        skips a sequence that finished in the step before."""
        self._stop_decoders.pop(seq.seq_id, None)
        self._release_forks(seq)
        for waiting in self.forks.values():
            if seq in waiting:  # a sample still waiting for its parent's prompt: not in the scheduler
                waiting.remove(seq)
                seq.status, seq.finish_reason = Status.FINISHED, "abort"
                return
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            if seq.token_ids[-1] < 0:  # the token of a step still in flight: never filled in now
                seq.token_ids.pop()

    def clear(self) -> List[Sequence]:
        """Drop every request (after an engine failure); returns the unfinished ones."""
        self.pending = None
        self.errors.clear()
        self.logprobs.clear()
        self._stop_decoders.clear()
        dropped = list(self.scheduler.running) + list(self.scheduler.waiting)
        dropped += [seq for waiting in self.forks.values() for seq in waiting]
        self.forks.clear()
        for seq in dropped:
            self.block_manager.free_blocks(seq)
            if self.encoder_cache is not None:  # its items stay held, unreferenced: evictable
                self.encoder_cache.release(seq.seq_id)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        return dropped

    def _finish_reason(self, seq: Sequence, token: int) -> Optional[str]:
        p = seq.params
        text, before = None, 0
        if p.stop and self.tokenizer is not None:  # decoded a few tokens a step, not the whole output
            decoder = self._stop_decoders.get(seq.seq_id)
            if decoder is None:
                decoder = self._stop_decoders[seq.seq_id] = IncrementalDecoder(self._decode)
            before = len(decoder.text)
            text = decoder.update(seq.output_token_ids)
        if seq.num_output_tokens < p.min_tokens:  # EOS and stop tokens were masked; strings wait too
            return "length" if seq.num_tokens >= self.max_model_len else None
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            return "stop"
        if text is not None:
            # only a stop string that the new text completes: one that ended earlier was seen then,
            # or came before min_tokens, when stop strings do not count
            hits = [i for i in (text.find(s, max(0, before - len(s) + 1)) for s in p.stop) if i >= 0]
            if hits:
                seq.text = text[:min(hits)]
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _decode(self, token_ids: List[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def output(self, seq: Sequence, decode: bool = True) -> RequestOutput:
        """decode=False leaves the text "" unless a stop string cut it (the server decodes off
        the engine's thread)."""
        self._stop_decoders.pop(seq.seq_id, None)
        token_ids = [t for t in seq.output_token_ids if t >= 0]  # EOS stays, as in vLLM; the text skips it
        text = seq.text  # cut at a stop string (maybe to ""), else decoded here
        if text is None and not decode:
            text = ""
        elif text is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        logprobs = self.logprobs.pop(seq.seq_id, []) if seq.params.logprobs is not None else None
        first, last = seq.first_token_time, seq.finish_time
        return RequestOutput(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens],
                             [CompletionOutput(text, token_ids, seq.finish_reason, logprobs)],
                             error=self.errors.pop(seq.seq_id, None),
                             num_preemptions=seq.num_preemptions,
                             time_to_first_token=None if first is None else first - seq.arrival_time,
                             latency=None if last is None else last - seq.arrival_time)

    def score(self, windows: Seq[List[int]]) -> List[float]:
        """Summed negative log-likelihood (nats) of each window's tokens after its first, given
        their prefixes: one prefill step a window, the forward the engine serves with (quantized
        layers, K/V read back from the cache at its precision). For task=eval."""
        while self.has_work():  # the runner's cache and sampled buffer are ours alone from here
            self.step()
        nlls = []
        for ids in windows:
            seq = Sequence(list(ids), SamplingParams(max_tokens=1))
            self.block_manager.allocate(seq, len(ids))
            try:
                step = build_step_input(ScheduledBatch([seq], [len(ids)]), self.block_size)
                step.logits_indices = list(range(len(ids) - 1))  # every position predicts the next
                logits = self.runner.run(step)
            finally:
                self.block_manager.free_blocks(seq)
            targets = torch.tensor(ids[1:], dtype=torch.int64, device=logits.device)
            nlls.append(F.cross_entropy(logits.double(), targets, reduction="sum").item())
        return nlls

    def generate(self, prompts: Seq[Prompt], params: Union[SamplingParams, Seq[SamplingParams]],
                 progress: bool = False) -> List[RequestOutput]:
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompts)} prompts")
        results: List[Union[Sequence, RequestOutput]] = []
        bar = None
        try:
            for prompt, sp in zip(prompts, params_list):
                results.append(self.add_request(prompt, sp))
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(results), desc="generate", unit="req", dynamic_ncols=True)
                bar.update(sum(isinstance(r, RequestOutput) for r in results))
            while self.has_work():
                done = self.step()
                if bar is not None and done:
                    bar.update(len(done))
        finally:  # interrupted (Ctrl-C): nothing of this call stays in the engine for the next one
            for seq in results:
                if isinstance(seq, Sequence) and not seq.is_finished:
                    self.abort(seq)
            if bar is not None:
                bar.close()
        return [r if isinstance(r, RequestOutput) else self.output(r) for r in results]
