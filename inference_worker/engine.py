"""LLMEngine: requests in, streamed RequestOutputs out, one background thread running steps.

A step: (under the lock) serve LoadAdapter pins, schedule, build inputs; (unlocked) run
the model and queue sampling on the device; (under the lock, while the GPU runs) send
the previous step's outputs: detokenize, stop strings, callbacks; then read the tokens
and record them (stops by token id or length free the sequence at once). On CPU, or
with overlap_outputs off, a step sends its own outputs. add/abort/pin/stats take the
lock only briefly, so they never wait for a forward pass; an abort frees blocks and
slot at once, and a step in flight drops that sequence's token.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from inference_worker.adapter_gate import TicketGate
from inference_worker.block_manager import BlockManager, blocks_for
from inference_worker.config import EngineConfig
from inference_worker.cuda_graphs import default_buckets
from inference_worker.detokenizer import IncrementalDetokenizer
from inference_worker.device import resolve, use_device
from inference_worker.interfaces import (
    AdapterSource,
    AdapterTicket,
    EngineRequest,
    EngineStats,
    RequestOutput,
    TokenLogprobs,
)
from inference_worker.lora.slot_pool import SlotPool
from inference_worker.model.llama import LlamaSpec
from inference_worker.model.loader import load_hf_config, load_model, load_tokenizer
from inference_worker.model_runner import ModelRunner
from inference_worker.prompt_graphs import default_prompt_buckets
from inference_worker.sampler import Sampler
from inference_worker.scheduler import Scheduler
from inference_worker.sequence import Sequence
from kernels.backend import get_ops
from services.errors import InvalidArgument, OpenLoRAError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

_POLL_S = 0.005            # idle wait while requests or pins wait for adapter tickets
_CPU_KV_BYTES = 512 << 20  # default KV budget off CUDA


@dataclass
class _PinRequest:
    ticket: AdapterTicket
    pin: bool
    future: Future


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: str, adapter_source: AdapterSource, *,
                 random_weights: bool = False) -> None:
        """random_weights: read only config.json and the tokenizer from model_dir and draw the
        weights on the device (benchmarks of a model shape without its 16 GB of files)."""
        device, dtype = resolve(config.torch_device), config.torch_dtype       # "cuda" -> this thread's cuda:N
        use_device(device)
        hf_config = load_hf_config(model_dir)
        spec = LlamaSpec.from_hf(hf_config)
        self.config = config = config.resolved(spec.max_position_embeddings)
        self.max_model_len: int = config.max_model_len
        self.adapter_source = adapter_source
        self.tokenizer = load_tokenizer(model_dir)
        self.ops = get_ops(device)                    # reference kernels on CPU, Triton on CUDA
        self.model = load_model(model_dir, self.ops, device, dtype, config.max_model_len, random_weights=random_weights)
        self.slot_pool = SlotPool(self.model.lora_layers(), config.max_adapter_slots, config.max_lora_rank,
                                  config.max_num_batched_tokens, device, dtype,
                                  load_thread=config.adapter_load_thread)
        num_blocks = _num_kv_blocks(config, spec, device, dtype)
        buckets = prompt_buckets = None
        if config.cuda_graphs and device.type == "cuda":
            buckets = config.cuda_graph_buckets or default_buckets(config.max_num_seqs)
            if config.prompt_graphs:
                prompt_buckets = config.prompt_graph_buckets or default_prompt_buckets(config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.slot_pool, num_blocks, config.block_size, config.max_num_seqs,
                                  config.max_num_batched_tokens, config.max_model_len, cuda_graph_buckets=buckets,
                                  lora_overlap=config.lora_overlap, prompt_graph_buckets=prompt_buckets)
        if config.warm_kernels and self.ops.name == "triton":
            self._warm_kernels()
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.max_seq_tokens = min(self.max_model_len, num_blocks * config.block_size)
        self.scheduler = Scheduler(self.block_manager, TicketGate(self.slot_pool), config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_seq_tokens,
                                   hold_prefill_steps=config.hold_prefill_steps)
        self.sampler = Sampler(device, config.seed)
        self.device = device
        self.vocab_size = spec.vocab_size
        self.eos_token_ids = _eos_ids(model_dir, hf_config, self.tokenizer)
        # Test hook: called with (request_id, logits [V] float32 on CPU) for every sampled token.
        self.on_logits: Callable[[str, torch.Tensor], None] | None = None
        self._cond = threading.Condition(threading.RLock())   # reentrant: callbacks may abort
        self._seqs: dict[str, Sequence] = {}
        self._detoks: dict[str, IncrementalDetokenizer] = {}
        self._pin_requests: list[_PinRequest] = []
        # recorded tokens whose text is not out yet: (seq, token id, logprobs, token-id stop reason)
        self._unsent: list[tuple[Sequence, int, TokenLogprobs | None, str]] = []
        self._inflight: tuple | None = None          # (StepBatch, SampledTokens) of the step not read back
        self._user_pins: dict[str, int] = {}          # LoadAdapter pins by key
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("engine on %s (%s, %s kernels): %d KV blocks of %d tokens (%.1f MiB), %d adapter slots of "
                 "rank %d (%.1f MiB), max_model_len %d", device, dtype, self.ops.name,
                 num_blocks, config.block_size, self.runner.kv_cache_bytes / 2**20, config.max_adapter_slots,
                 config.max_lora_rank, self.slot_pool.nbytes / 2**20, self.max_model_len)

    def _warm_kernels(self) -> None:
        from inference_worker.lora.warmup import warm_lora_kernels

        try:
            # steps a prompt graph covers never run eagerly
            graphs = self.runner.prompt_graphs
            warm_lora_kernels(self.slot_pool, self.config.max_num_batched_tokens, self.config.max_num_seqs,
                              self.runner.eager_block_g, min_tokens=max(graphs.buckets) if graphs else 0)
            self.slot_pool.warm_fill()                 # the adapter loads' fill kernels
        except Exception:  # noqa: BLE001 - serving still works; a variant then compiles on first use
            log.exception("compiling the LoRA kernel variants ahead failed; they will compile on first use")

    # ---- public API (any thread) -------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._cond:
            self._send_outputs()
            for request_id in list(self._seqs):
                self._abort_locked(request_id)
            for pr in self._pin_requests:
                pr.future.set_exception(Unavailable("engine stopped"))
            self._pin_requests.clear()
        self.slot_pool.close()

    def add_request(self, request: EngineRequest) -> None:
        if not request.arrival_time:
            request.arrival_time = time.monotonic()
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidArgument("prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise InvalidArgument(f"prompt has {len(prompt)} tokens; this model allows at most "
                                  f"{self.max_model_len - 1} (max_model_len {self.max_model_len})")
        if blocks_for(len(prompt), self.config.block_size) > self.block_manager.num_blocks:
            raise InvalidArgument(f"prompt of {len(prompt)} tokens can never fit the KV cache "
                                  f"({self.block_manager.num_blocks * self.config.block_size} tokens)")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidArgument(f"prompt token ids must be in [0, {self.vocab_size})")
        with self._cond:
            self._check_admissible(request.request_id)
        # Resolve the adapter now so its fetch starts in the background (never under our lock).
        if request.merge is not None:
            ticket = self.adapter_source.request_merge(request.merge)
        else:
            ticket = self.adapter_source.request(request.adapter) if request.adapter else None
        seed = request.sampling.seed
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        seq = Sequence(request=request, ticket=ticket, generator=generator)
        with self._cond:
            self._check_admissible(request.request_id)
            self._seqs[request.request_id] = seq
            self._detoks[request.request_id] = IncrementalDetokenizer(self.tokenizer, prompt, request.sampling.stop)
            self.scheduler.add(seq)
            self._cond.notify_all()

    def abort_request(self, request_id: str) -> None:
        with self._cond:
            self._abort_locked(request_id)

    def pin_adapter(self, ticket: AdapterTicket, pin: bool = True) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                future.set_exception(Unavailable("engine is stopping"))
            else:
                self._pin_requests.append(_PinRequest(ticket, pin, future))
                self._cond.notify_all()
        return future

    def unpin_adapter(self, key: str) -> bool:
        with self._cond:
            pinned = self._user_pins.get(key, 0) > 0
            if pinned:
                self._user_pins[key] -= 1
                if not self._user_pins[key]:
                    del self._user_pins[key]
                self.slot_pool.release(key)
            return self.slot_pool.evict_if_idle(key) or pinned

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                gpu_adapters=self.slot_pool.resident(), free_adapter_slots=self.slot_pool.num_unpinned(),
                total_adapter_slots=self.slot_pool.num_slots, running_requests=len(self.scheduler.running),
                waiting_requests=len(self.scheduler.waiting), kv_blocks_used=self.block_manager.num_used,
                kv_blocks_total=self.block_manager.num_blocks)

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step; False when nothing could run. The engine thread calls it; tests may
        call it directly instead of start().

        With overlap_outputs, the previous step's outputs (detokenize, stop strings, callbacks)
        are produced while this step's forward runs on the GPU; token-id stops (eos, stop ids,
        length) still take a sequence out before the next schedule. With async_scheduling this
        step is scheduled and launched before the previous one's tokens are read back.
        """
        with self._cond:
            self._serve_pin_requests()
            out = self.scheduler.schedule()
            for seq in out.failed:
                self._finish(seq, "error", [], "")
            batch = None
            if not out.is_empty:
                now = time.monotonic()
                for seq in out.prefills:
                    seq.first_scheduled_at = seq.first_scheduled_at or now
                batch = self.runner.prepare(out.prefills, out.decodes)
        inflight, self._inflight = self._inflight, None
        if batch is None and inflight is None:
            with self._cond:
                self._send_outputs()
            return False
        if inflight is not None and batch is not None and (self.on_logits is not None or any(
                s.request.sampling.repetition_penalty != 1.0 for s in batch.seqs)):
            self._read_back(*inflight)                     # the history must be on the host first
            inflight = None
        if batch is not None:
            self._launch(batch)
            if self._unsent:
                with self._cond:
                    self._send_outputs()                   # the GPU is busy with this step meanwhile
            if not self.config.async_scheduling:
                inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._read_back(*inflight)
        with self._cond:
            if self.config.async_scheduling or not self.config.overlap_outputs or not self.scheduler.has_work():
                self._send_outputs()
        return True

    def _launch(self, batch) -> None:
        """Forward and sampling queued on the device; the step is then in flight."""
        logits = self.runner.forward(batch)
        if self.on_logits is not None:
            rows = logits.detach().cpu().clone()          # the sampler edits logits in place
            for seq, row in zip(batch.seqs, rows):
                if not seq.is_finished:                  # (async: may have ended since it was scheduled)
                    self.on_logits(seq.request_id, row)
        sampled = self.sampler.launch(
            logits, [s.request.sampling for s in batch.seqs], [s.generator for s in batch.seqs],
            [s.all_token_ids if s.request.sampling.repetition_penalty != 1.0 else [] for s in batch.seqs])
        with self._cond:
            for row, seq in enumerate(batch.seqs):
                # this step's inputs are (or will be, in stream order) cached; its token is pending
                seq.num_cached, seq.pending_row = seq.num_tokens, row
                seq.num_pending += 1
        self.runner.prev_tokens = sampled.token_ids
        self._inflight = (batch, sampled)

    def _read_back(self, batch, sampled) -> None:
        """Wait for an in-flight step's tokens and record them."""
        token_ids, logprobs = sampled.result()
        with self._cond:
            for seq, token_id, lp in zip(batch.seqs, token_ids, logprobs):
                if not seq.is_finished:                  # aborted, or stopped by a string, meanwhile
                    seq.num_pending -= 1
                    self._record_token(seq, token_id, lp)

    def _record_token(self, seq: Sequence, token_id: int, logprob: TokenLogprobs | None) -> None:
        """The token joins the sequence now; its text goes out with _send_outputs. A stop by
        token id or length frees the sequence's blocks and slot at once."""
        sampling = seq.request.sampling
        seq.output_token_ids.append(token_id)
        seq.first_token_at = seq.first_token_at or time.monotonic()
        reason = ""
        if token_id in sampling.stop_token_ids:
            reason = "stop"
        elif token_id in self.eos_token_ids and not sampling.ignore_eos:
            reason = "eos"
        elif len(seq.output_token_ids) >= sampling.max_tokens or \
                len(seq.prompt_token_ids) + len(seq.output_token_ids) >= self.max_seq_tokens:
            reason = "length"
        if reason:
            self.scheduler.finish(seq)
        self._unsent.append((seq, token_id, logprob, reason))

    def _send_outputs(self) -> None:
        """Detokenize and stream the recorded tokens; finish sequences that stopped."""
        unsent, self._unsent = self._unsent, []
        for seq, token_id, logprob, reason in unsent:
            if self._seqs.get(seq.request_id) is not seq:
                continue                                   # cancelled or failed since: already final
            detok = self._detoks[seq.request_id]
            text = ""
            if reason not in ("stop", "eos"):              # stop/eos tokens are not text
                text = detok.add(token_id)
                if detok.stopped:
                    reason = "stop"
            lps = [logprob] if logprob is not None else []
            if reason:
                self._finish(seq, reason, [token_id], text + detok.flush(), lps)
            else:
                self._emit(seq, [token_id], text, lps)

    # ---- internals (under the lock) ----------------------------------------------------
    def _check_admissible(self, request_id: str) -> None:
        if self._stopping:
            raise Unavailable("engine is stopping")
        if request_id in self._seqs:
            raise InvalidArgument(f"request id {request_id!r} is already in use")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise ResourceExhausted(f"waiting queue is full ({self.config.max_waiting} requests)")

    def _abort_locked(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq, "cancelled", [], "")

    def _finish(self, seq: Sequence, reason: str, token_ids: list[int], text: str,
                logprobs: list[TokenLogprobs] | None = None) -> None:
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        self._detoks.pop(seq.request_id, None)
        self._emit(seq, token_ids, text, logprobs or [], reason)

    def _emit(self, seq: Sequence, token_ids: list[int], text: str, logprobs: list[TokenLogprobs],
              finish_reason: str = "") -> None:
        callback = seq.request.on_output
        if callback is None:
            return
        out = RequestOutput(
            request_id=seq.request_id, token_ids=token_ids, text=text, logprobs=logprobs,
            finished=bool(finish_reason), finish_reason=finish_reason,
            error=seq.error if finish_reason == "error" else None,
            prompt_tokens=len(seq.prompt_token_ids), completion_tokens=len(seq.output_token_ids),
            queue_ms=seq.ms_since_arrival(seq.first_scheduled_at),
            adapter_load_ms=seq.ms_since_arrival(seq.adapter_ready_at),
            first_token_ms=seq.ms_since_arrival(seq.first_token_at), total_ms=seq.now_ms())
        try:
            callback(out)
        except Exception:
            log.exception("on_output callback of %s raised", seq.request_id)

    def _serve_pin_requests(self) -> None:
        waiting = []
        for pr in self._pin_requests:
            if pr.future.cancelled():
                continue
            error = pr.ticket.error()
            if error is not None:
                pr.future.set_exception(error)
                continue
            if not pr.ticket.ready():
                waiting.append(pr)
                continue
            key = pr.ticket.key
            try:
                slot = self.slot_pool.acquire(key, pr.ticket.weights)
            except OpenLoRAError as exc:
                pr.future.set_exception(exc)
                continue
            if slot is None:
                pr.future.set_exception(ResourceExhausted("every adapter slot is pinned"))
                continue
            if pr.pin:
                self._user_pins[key] = self._user_pins.get(key, 0) + 1
            else:
                self.slot_pool.release(key)        # resident, evictable
            pr.future.set_result(None)
        self._pin_requests = waiting

    def _loop(self) -> None:
        use_device(self.device)
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not self.scheduler.has_work() and not self._pin_requests:
                    self._cond.wait()
                    continue
            try:
                ran = self.step()
            except Exception as exc:
                log.exception("engine step failed")
                self._fail_running(exc)
                ran = True
            if not ran:
                with self._cond:                       # only tickets to wait for: poll them
                    if not self._stopping:
                        self._cond.wait(timeout=_POLL_S)

    def _fail_running(self, exc: Exception) -> None:
        with self._cond:
            for seq in list(self.scheduler.running):
                seq.error = OpenLoRAError(f"internal error in engine step: {type(exc).__name__}: {exc}")
                self._finish(seq, "error", [], "")


def _num_kv_blocks(config: EngineConfig, spec: LlamaSpec, device: torch.device, dtype: torch.dtype) -> int:
    """Blocks from the budget; never more than max_num_seqs full-length sequences can use."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    bytes_per_block = (2 * spec.num_layers * config.block_size * spec.num_kv_heads * spec.head_dim
                       * torch.empty((), dtype=dtype).element_size())
    if config.kv_cache_bytes:
        budget = config.kv_cache_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.kv_memory_fraction)
    else:
        budget = _CPU_KV_BYTES
    num_blocks = min(budget // bytes_per_block, config.max_num_seqs * blocks_for(config.max_model_len, config.block_size))
    if num_blocks < 1:
        raise ValueError(f"KV budget of {budget} bytes is less than one block ({bytes_per_block} bytes)")
    return num_blocks


def _eos_ids(model_dir: str, hf_config, tokenizer) -> frozenset[int]:
    """End-of-sequence ids from config.json, generation_config.json (Llama 3 instruct lists
    several there) and the tokenizer."""
    from transformers import GenerationConfig

    sources = [getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    try:
        sources.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:                       # no generation_config.json
        pass
    ids: set[int] = set()
    for value in sources:
        ids.update([value] if isinstance(value, int) else (value or []))
    return frozenset(ids)
