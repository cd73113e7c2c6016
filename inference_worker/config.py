"""EngineConfig: every knob of the engine core, validated once at construction.

Values that depend on the model (max_model_len, max_num_batched_tokens) may be
left None here; `resolved(...)` fills them from the model's config and checks
the cross-field rules the engine relies on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    device: str = "auto"                  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"                   # "auto" (bfloat16 on cuda, float32 on cpu) or a DTYPES key
    block_size: int = 16                  # tokens per KV block
    # KV budget, first match wins: num_kv_blocks; kv_cache_bytes; on CUDA kv_memory_fraction of
    # the free memory left after weights and LoRA pools; on CPU 512 MiB. Never more blocks than
    # max_num_seqs full-length sequences can use.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_memory_fraction: float = 0.9
    max_num_seqs: int = 64                # running sequences per step
    max_num_batched_tokens: int | None = None   # tokens per step; None = max(2048, max_model_len)
    max_model_len: int | None = None      # prompt + output; None = the model's max_position_embeddings
    max_waiting: int = 1024               # queue limit: add_request raises ResourceExhausted past it
    max_adapter_slots: int = 8            # device LoRA slots (adapters resident at once)
    max_lora_rank: int = 64               # slot width; larger adapters are FailedPrecondition
    seed: int = 0                         # generator of requests that give no seed
    # Decode-only steps replay a CUDA graph captured per batch-size bucket (CUDA only; ignored on
    # CPU). Buckets: None = 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, then every 64, up to max_num_seqs.
    cuda_graphs: bool = True
    cuda_graph_buckets: tuple[int, ...] | None = None
    # In those graphs each LoRA shrink runs on a second stream beside its base matmul
    # (inference_worker/lora/layers.py; H200: S100's decode step 8.06 -> 7.95 ms).
    lora_overlap: bool = True
    # Every other step runs as piecewise graphs (the model between attention calls) per token
    # bucket, attention eagerly between them (inference_worker/prompt_graphs.py; CUDA graphs
    # only). Buckets: None = every 128 tokens up to 2,048 (or max_num_batched_tokens); larger steps
    # run eagerly.
    prompt_graphs: bool = True
    prompt_graph_buckets: tuple[int, ...] | None = None
    # Background work, each None = on for CUDA (where the GPU runs ahead of the host), off on
    # CPU (a synchronous forward leaves nothing to overlap). Measured on an H200 with all three
    # on: S0 decode step 6.70 -> 5.62 ms, S1000 2946 -> 3409 tok/s (bench/results/engine-h200-runs.md).
    # - overlap_outputs: a step's output work (detokenize, stop strings, stream out) runs during
    #   the next step's forward; outputs leave one step later, and a stop string can cost one
    #   extra (dropped) token of compute.
    overlap_outputs: bool | None = None
    # - adapter_load_thread: adapter copies into device slots are issued from a loader thread
    #   (~7-10 ms of host time per Llama-3-8B adapter kept off the engine thread).
    adapter_load_thread: bool | None = None
    # - async_scheduling: step N+1 is scheduled, prepared and launched while step N runs on the
    #   GPU; its decode inputs are step N's sampled tokens, gathered on the device, so the host
    #   never waits between steps. Finished sequences are noticed one step later (their extra
    #   token is dropped).
    async_scheduling: bool | None = None
    # Ready prompts wait up to this many steps for a waiting request whose adapter is still being
    # fetched or copied, so one burst of prompts shares one eager step (inference_worker/scheduler.py,
    # rule 3). 0 = off (default: on the H200, 1 gained 1 % at S1000 and cost 55 ms of TTFT p50,
    # bench/results/engine-h200-runs.md, run 18).
    hold_prefill_steps: int = 0
    # Compile at start the SGMV kernel variants prompt steps can meet (inference_worker/lora/warmup.py),
    # instead of on first use with the batch waiting; None = on for CUDA (Triton), off on CPU.
    warm_kernels: bool | None = None

    def __post_init__(self) -> None:
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"bad device {self.device!r}: {exc}") from None
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.hold_prefill_steps < 0:
            raise ValueError("hold_prefill_steps must be >= 0")
        for name in ("block_size", "max_num_seqs", "max_waiting", "max_adapter_slots", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None)")
        for name in ("cuda_graph_buckets", "prompt_graph_buckets"):
            sizes = getattr(self, name)
            if sizes is not None and (not sizes or min(sizes) < 1):
                raise ValueError(f"{name} must be a non-empty tuple of sizes >= 1 (or None)")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError("kv_memory_fraction must be in (0, 1]")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token each)")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def resolved(self, model_max_len: int) -> EngineConfig:
        """A copy with the model-dependent fields filled and cross-checked.

        No chunked prefill: a preempted sequence is recomputed in one step, so a step
        must hold a whole max_model_len sequence.
        """
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(f"max_model_len {max_model_len} > the model's {model_max_len}")
        batched = self.max_num_batched_tokens or max(2048, max_model_len, self.max_num_seqs)
        if batched < max_model_len:
            raise ValueError(f"max_num_batched_tokens {batched} < max_model_len {max_model_len} "
                             "(a step must fit a whole sequence: no chunked prefill)")
        on_cuda = self.torch_device.type == "cuda"
        background = {name: on_cuda if getattr(self, name) is None else getattr(self, name)
                      for name in ("overlap_outputs", "adapter_load_thread", "async_scheduling", "warm_kernels")}
        return dataclasses.replace(self, max_model_len=max_model_len, max_num_batched_tokens=batched, **background)
