"""The engine: requests in, tokens out, one scheduled step at a time.

``add_request`` queues a prompt with its ``SamplingParams``; each ``step`` schedules (continuous
batching, chunked prefill, prefix caching, preemption), runs the model once, samples, detects
stop strings and returns the updated requests. ``generate`` runs a list of prompts to the end.
The server and the benchmarks talk only to this class.

Speculative decoding (``draft=`` a small model with the same tokenizer, or
``speculative_method="ngram"``) proposes up to ``num_speculative_tokens`` drafts per decoding
sequence, verifies them in the same forward pass as everything else and emits the accepted ones
plus one; see ``quantkit.runtime.spec``. Counters are in ``spec_metrics``.

``async_scheduling`` (default: on CUDA devices) launches each steady decode step before the
previous step's tokens reach the host, so the host work overlaps the GPU's; see
``quantkit.runtime.async_step``.
"""

from __future__ import annotations

import itertools
import time

import torch

from quantkit.errors import QuantkitError
from quantkit.kernels import kernel_mode
from quantkit.runtime.async_step import AsyncStepper
from quantkit.runtime.block_manager import BlockManager
from quantkit.runtime.model_runner import ModelRunner, plan_num_blocks
from quantkit.runtime.outputs import CompletionOutput, RequestOutput
from quantkit.runtime.paged_llama import PagedLlama
from quantkit.runtime.sampler import Sampler
from quantkit.runtime.sampling_params import SamplingParams
from quantkit.runtime.scheduler import Scheduler
from quantkit.runtime.sequence import FINISH_STATUS, Sequence
from quantkit.runtime.spec.metrics import SpecMetrics
from quantkit.runtime.spec.setup import (
    SpecOptions,
    build_speculator,
    load_draft,
    target_share_of_blocks,
    weight_bytes,
)
from quantkit.runtime.spec.verifier import Verified
from quantkit.runtime.stop_strings import StopChecker


class Engine:
    def __init__(self, model=None, *, device: str = "cpu", dtype: str = "auto", block_size: int = 16,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 enable_prefix_caching: bool = True, draft: str | None = None, num_speculative_tokens: int = 4,
                 speculative_method: str | None = None, ngram_min: int = 1, ngram_max: int = 3,
                 spec_max_batch: int = 32, adaptive_speculation: bool = True,
                 cuda_graphs: bool | str = True, async_scheduling: bool | None = None) -> None:
        from quantkit.models.loading import LoadedModel, load_model

        spec = SpecOptions(speculative_method, draft, num_speculative_tokens, ngram_min, ngram_max,
                           spec_max_batch, adaptive_speculation)
        method = spec.resolved_method()
        # a LoadedModel (already in memory, e.g. a benchmark's random model on the GPU) is used as is
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device="cpu")
        torch_device = torch.device(device)
        compute_dtype = loaded.model.dtype if torch_device.type == "cuda" else torch.float32
        self.model = PagedLlama(loaded.model, torch_device, compute_dtype)
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.model.config.max_position_embeddings
        draft_model = load_draft(draft, dtype=dtype, device=torch_device, target_vocab=loaded.model.config.vocab_size) \
            if method == "draft" else None
        if draft_model is not None:
            self.max_model_len = min(self.max_model_len, draft_model.max_model_len)
        num_blocks = plan_num_blocks(self.model, block_size, kv_cache_tokens=kv_cache_tokens,
                                     gpu_memory_utilization=gpu_memory_utilization)
        if draft_model is not None and kv_cache_tokens is None:
            num_blocks = target_share_of_blocks(num_blocks, self.model, draft_model.model)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        eos = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
        eos = eos if eos is not None else loaded.model.config.eos_token_id
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens, max_num_seqs,
                                   min(self.max_model_len, num_blocks * block_size), eos)
        # decode steps replay CUDA graphs on the GPU; "eager-static" runs their padded path without capture
        # (QUANTKIT_KERNELS=reference on CUDA runs uncapturable reference kernels: no graphs then)
        graphs = cuda_graphs if cuda_graphs == "eager-static" else (
            bool(cuda_graphs) and torch_device.type == "cuda" and kernel_mode() != "reference")
        self.runner = ModelRunner(self.model, self.block_manager, decode_graphs=graphs, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len)
        self.sampler = Sampler()
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._requests: dict[str, _Request] = {}
        self.speculator = build_speculator(spec, draft_model, target_bytes=weight_bytes(loaded.model),
                                           num_blocks=num_blocks, block_size=block_size, decode_graphs=graphs,
                                           max_model_len=self.max_model_len)
        # steady decode steps launch before the previous step's tokens reach the host (not with speculation);
        # by default on CUDA, where it hides the host's work (on the CPU nothing runs beside the host)
        if async_scheduling is None:
            async_scheduling = torch_device.type == "cuda"
        self.async_stepper = AsyncStepper(self) if async_scheduling and self.speculator is None else None
        del loaded

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = (params or SamplingParams()).validate(self.max_model_len)
        ids = self._encode(prompt)
        if not ids:
            raise QuantkitError("the prompt is empty")
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise QuantkitError(f"request id '{request_id}' is already in use")
        seq = Sequence(next(self._seq_ids), request_id, ids, params)
        self.scheduler.add(seq)  # refuses prompts longer than the context
        self._requests[request_id] = _Request(request_id, ids, params, [seq], self.tokenizer, seq.arrival_time)
        return request_id

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            seqs = self.scheduler.abort(request_id)
            if self.speculator is not None:
                self.speculator.release(seqs)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def spec_metrics(self) -> SpecMetrics | None:
        """Speculative decoding's counters (None when the engine does not speculate)."""
        return None if self.speculator is None else self.speculator.metrics

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            return self._speculative_step()
        if self.async_stepper is not None:
            return self.async_stepper.step()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        return self._plain_step(out)

    def _plain_step(self, out) -> list[RequestOutput]:
        """Run, sample one token per sampling sequence, update, collect."""
        logits = self.runner.run(out)
        now = time.perf_counter()
        new_tokens: dict[int, list[int]] = {}
        sampling = [s.seq for s in out.scheduled if s.seq.seq_id in logits]
        sampling += self._fork_parallel_samples(sampling, logits)
        if sampling:
            rows = torch.cat([logits[seq.seq_id][-1:] for seq in sampling])
            tokens, logprobs = self.sampler.sample(rows, [seq.params for seq in sampling],
                                                   [self._requests[seq.request_id].generator(seq, rows.device) for seq in sampling])
            for seq, token, logprob in zip(sampling, tokens.tolist(), logprobs.tolist()):
                new_tokens[seq.seq_id] = [token]
                if seq.params.wants_logprobs:
                    seq.output_logprobs.append(logprob)
        self.scheduler.update(new_tokens)
        return self._collect(sampling, now)

    def _speculative_step(self) -> list[RequestOutput]:
        """Like ``step``, with drafts proposed for decoding sequences and verified in the forward."""
        spec = self.speculator
        started = time.perf_counter()
        out = self.scheduler.schedule(spec.plan(self.scheduler.running))
        spec.release(out.preempted)
        if out.is_empty:
            return []
        if not any(s.num_lookahead for s in out.scheduled):  # speculation off this step: the plain path
            before = {s.seq.seq_id: s.seq.num_output_tokens for s in out.scheduled}
            outputs = self._plain_step(out)
            emitted = sum(s.seq.num_output_tokens - before[s.seq.seq_id] for s in out.scheduled)
            pure_decode = all(s.num_new_tokens == 1 and s.samples for s in out.scheduled)
            spec.record_step(time.perf_counter() - started, emitted, pure_decode)
            spec.release_finished()
            return outputs
        proposals = spec.propose(out)
        logits = self.runner.run(out, spec.drafts_for_runner(out, proposals))
        now = time.perf_counter()
        sampling = [s.seq for s in out.scheduled if s.seq.seq_id in logits]
        sampling += self._fork_parallel_samples(sampling, logits)
        verified = {}
        if sampling:
            device = next(iter(logits.values())).device
            generators = [self._requests[seq.request_id].generator(seq, device) for seq in sampling]
            verified = spec.verify(self.sampler, sampling, logits, proposals, generators)
        before = {seq.seq_id: seq.num_output_tokens for seq in sampling}
        self.scheduler.update({seq_id: v.tokens for seq_id, v in verified.items()})
        for seq in sampling:
            self._after_verified(seq, verified[seq.seq_id], before[seq.seq_id])
        emitted = sum(seq.num_output_tokens - before[seq.seq_id] for seq in sampling)
        pure_decode = all(s.num_new_tokens - s.num_lookahead == 1 and s.samples for s in out.scheduled)
        spec.record_step(time.perf_counter() - started, emitted, pure_decode)
        outputs = self._collect(sampling, now)
        spec.release_finished()
        return outputs

    def _after_verified(self, seq: Sequence, verified: Verified, num_before: int) -> None:
        """Logprobs of the tokens the scheduler kept; a stop string ending before the last of them."""
        num_kept = seq.num_output_tokens - num_before
        if seq.params.wants_logprobs:
            seq.output_logprobs.extend(verified.logprobs[:num_kept])
        request = self._requests.get(seq.request_id)
        if request is None or num_kept < 2 or not request.params.stop:
            return
        checker = request.stop_checker(seq)
        for end in range(num_before + 1, seq.num_output_tokens):  # the last one is _collect's check
            if checker.check(seq.output_token_ids[:end]) is not None:
                self.scheduler.finish(seq, "stop")  # or it ended later in this step: the stop came first
                seq.status, seq.finish_reason = FINISH_STATUS["stop"], "stop"
                del seq.output_logprobs[end:]
                return

    def _fork_parallel_samples(self, sampling: list[Sequence], logits: dict[int, torch.Tensor]) -> list[Sequence]:
        """Children for ``n > 1``, forked when the parent's prompt is done: they share its KV blocks
        (copy-on-write) and draw their first token from the same logits with their own seeds."""
        children = []
        for seq in sampling:
            request = self._requests[seq.request_id]
            if seq.params.n > 1 and seq.num_output_tokens == 0 and len(request.seqs) == 1:
                for index in range(1, seq.params.n):
                    child = self.scheduler.fork(seq, next(self._seq_ids), sample_index=index)
                    request.seqs.append(child)
                    children.append(child)
                    logits[child.seq_id] = logits[seq.seq_id]
        return children

    def _collect(self, sampled: list[Sequence], now: float) -> list[RequestOutput]:
        touched = {seq.request_id for seq in sampled}
        outputs = []
        for request_id in touched:
            request = self._requests.get(request_id)
            if request is None:
                continue
            request.record_step(now)
            for seq in request.seqs:
                if not seq.is_finished:
                    reason = request.stop_checker(seq).check(seq.output_token_ids)
                    if reason is not None:
                        self.scheduler.finish(seq, reason)
            output = request.output(now)
            outputs.append(output)
            if output.finished:
                del self._requests[request_id]
        return outputs

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[i] for i in ids]

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise QuantkitError("this checkpoint has no tokenizer: give token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return [int(t) for t in prompt]


class _Request:
    def __init__(self, request_id, prompt_ids, params, seqs, tokenizer, arrival) -> None:
        self.request_id, self.prompt_ids, self.params, self.seqs = request_id, prompt_ids, params, seqs
        self.tokenizer = tokenizer
        self.arrival = arrival
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self._generators: dict[int, torch.Generator | None] = {}
        self._stops: dict[int, StopChecker] = {}

    def generator(self, seq: Sequence, device: torch.device) -> torch.Generator | None:
        if seq.seq_id not in self._generators:
            self._generators[seq.seq_id] = self.params.make_generator(device, seq.sample_index)
        return self._generators[seq.seq_id]

    def stop_checker(self, seq: Sequence) -> StopChecker:
        if seq.seq_id not in self._stops:
            self._stops[seq.seq_id] = StopChecker(self.tokenizer, self.params.stop)
        return self._stops[seq.seq_id]

    def record_step(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def output(self, now: float) -> RequestOutput:
        completions = []
        for seq in sorted(self.seqs, key=lambda s: s.sample_index):
            checker = self.stop_checker(seq)
            tokens = seq.output_token_ids[: checker.keep_tokens] if checker.keep_tokens is not None \
                else list(seq.output_token_ids)
            completions.append(CompletionOutput(seq.sample_index, tokens, checker.text(tokens), seq.finish_reason,
                                                list(seq.output_logprobs) if self.params.wants_logprobs else None))
        finished = all(seq.is_finished for seq in self.seqs) and len(self.seqs) == self.params.n
        return RequestOutput(self.request_id, self.prompt_ids, completions, finished, self.arrival,
                             self.first_token_time, list(self.token_times), now if finished else None)
