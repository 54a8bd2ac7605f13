"""The engine loop: admit requests, schedule a step, run the model, sample, detokenize.

It lives on rank 0. A request it cannot serve (empty, too long, bad token ids or settings)
finishes at once with an error; it never reaches the scheduler, so no other request is hurt.
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
from framework.engine.model_runner import ModelRunner
from framework.engine.outputs import CompletionOutput, RequestOutput
from framework.engine.sampler import sample
from framework.engine.sampling_params import SamplingParams
from framework.engine.scheduler import ScheduledBatch, Scheduler
from framework.engine.sequence import Sequence
from framework.engine.step_input import build_step_input

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


class LLMEngine:
    def __init__(self, cfg: FrameworkConfig, runner: ModelRunner, tokenizer: Any, eos_token_ids: Seq[int]):
        """`cfg` resolved (framework/resolve.py): max_model_len and max_num_seqs are numbers."""
        self.cfg, self.runner, self.tokenizer = cfg, runner, tokenizer
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
        if spec.num_window_layers and window_blocks < min(-(-max_model_len // self.block_size),
                                                          window_blocks_per_request(self.block_size, spec.sliding_window,
                                                                                    max_model_len)):
            raise UserError(runner.kv_shortfall(0, max_model_len))
        runner.allocate_kv_cache(num_blocks, window_blocks)
        log.info("KV cache: %d blocks x %d tokens = %d tokens; %.1f requests of %d tokens at once%s",
                 num_blocks, self.block_size, num_blocks * self.block_size,
                 num_blocks * self.block_size / max_model_len, max_model_len,
                 f"; sliding-window layers: {window_blocks} blocks of their own, freed as the window "
                 f"({spec.sliding_window} tokens) passes" if spec.num_window_layers else "")
        self.block_manager = BlockManager(num_blocks, self.block_size, cfg.cache.enable_prefix_caching,
                                          window_blocks, spec.sliding_window if spec.num_window_layers else 0)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, cfg.cache.max_num_batched_tokens)
        self.generator = torch.Generator().manual_seed(cfg.model.seed)
        self._ids = itertools.count()
        self.num_generated_tokens = 0
        self.pending: Optional[LaunchedStep] = None  # async scheduling: launched, not yet resolved
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
        if not token_ids:
            return "the prompt is empty"
        if len(token_ids) >= self.max_model_len:
            return (f"the prompt has {len(token_ids)} tokens; cache.max_model_len={self.max_model_len} "
                    "leaves no room to generate")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        return params.problem()

    def add_request(self, prompt: Prompt, params: SamplingParams) -> Union[Sequence, RequestOutput]:
        """A Sequence now in the scheduler, or a finished RequestOutput carrying the error."""
        request_id = str(next(self._ids))
        try:
            text, token_ids = self._tokenize(prompt)
            problem = self._problem(token_ids, params)
        except Exception as exc:  # a tokenizer failure is this request's problem only
            text, token_ids, problem = None, [], f"could not tokenize the prompt: {exc}"
        if problem:
            return RequestOutput(request_id, text, token_ids, [CompletionOutput("", [], "error")],
                                 error=f"request {request_id}: {problem}")
        seq = Sequence(token_ids, params, request_id=request_id, prompt=text)
        self.scheduler.add(seq)
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

    def step(self) -> List[Sequence]:
        """One scheduler step; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        launched = self._launch(batch) if batch.seqs else None
        finished = self._resolve(self.pending) if self.pending is not None else []
        self.pending = None
        if launched is not None:
            self._commit(launched)
            if launched.tokens_host is not None:
                self.pending = launched
            else:
                finished += self._resolve(launched)
        return finished

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        step = build_step_input(batch, self.block_size)
        logits = self.runner.run(step, keep_on_device=True)  # only sampled tokens come back to the host
        sampling = [seq for seq, n in zip(batch.seqs, batch.num_new_tokens)
                    if seq.num_computed_tokens + n == seq.num_tokens]  # reached the newest token
        if not (self.runner.async_scheduling and all(s.params.greedy for s in sampling)):
            return LaunchedStep(batch, sampling, logits=logits)
        tokens = self.runner.sampled[:len(sampling)]
        torch.argmax(logits, dim=-1, out=tokens)
        self._flip ^= 1  # two host buffers: the pending step's tokens are still to be read from the other
        host = self._host_tokens[self._flip][:len(sampling)]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event() if tokens.is_cuda else None
        if ready is not None:
            ready.record()
        return LaunchedStep(batch, sampling, tokens_host=host, ready=ready)

    def _commit(self, launched: LaunchedStep) -> None:
        batch = launched.batch
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # finished in the step before, which resolved after this one launched
                continue
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)  # placeholders are never among the computed tokens
        for row, seq in enumerate(launched.sampling):
            if not seq.is_finished:
                seq.token_ids.append(-1 - row)

    def _resolve(self, launched: LaunchedStep) -> List[Sequence]:
        seqs = launched.sampling
        if launched.tokens_host is not None:
            if launched.ready is not None:
                launched.ready.synchronize()
            tokens = launched.tokens_host.tolist()
        else:
            tokens = sample(launched.logits, [s.params for s in seqs], [s.generator for s in seqs], self.generator)
        finished = []
        now = time.perf_counter()
        for seq, token in zip(seqs, tokens):
            if seq.is_finished:
                continue
            seq.token_ids[-1] = token  # its placeholder: nothing is appended between commit and resolve
            seq.first_token_time = seq.first_token_time or now
            self.num_generated_tokens += 1
            reason = self._finish_reason(seq, token)
            if reason:
                seq.finish_time = now
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def abort(self, seq: Sequence) -> None:
        """Drop one unfinished request (its client went away); a step in flight skips it, as it
        skips a sequence that finished in the step before."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            if seq.token_ids[-1] < 0:  # the token of a step still in flight: never filled in now
                seq.token_ids.pop()

    def clear(self) -> List[Sequence]:
        """Drop every request (after an engine failure); returns the unfinished ones."""
        self.pending = None
        dropped = list(self.scheduler.running) + list(self.scheduler.waiting)
        for seq in dropped:
            self.block_manager.free_blocks(seq)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        return dropped

    def _finish_reason(self, seq: Sequence, token: int) -> Optional[str]:
        p = seq.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            return "stop"
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                seq.text = text[:min(hits)]
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def output(self, seq: Sequence) -> RequestOutput:
        token_ids = list(seq.output_token_ids)  # EOS stays in token_ids, as in vLLM; the text skips it
        text = seq.text
        if not text and self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return RequestOutput(seq.request_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens],
                             [CompletionOutput(text, token_ids, seq.finish_reason)],
                             num_preemptions=seq.num_preemptions,
                             time_to_first_token=seq.first_token_time - seq.arrival_time,
                             latency=seq.finish_time - seq.arrival_time)

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
        results: List[Union[Sequence, RequestOutput]] = [self.add_request(p, sp)
                                                         for p, sp in zip(prompts, params_list)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(results), desc="generate", unit="req", dynamic_ncols=True)
            bar.update(sum(isinstance(r, RequestOutput) for r in results))
        while self.has_work():
            done = self.step()
            if bar is not None and done:
                bar.update(len(done))
        if bar is not None:
            bar.close()
        return [r if isinstance(r, RequestOutput) else self.output(r) for r in results]
