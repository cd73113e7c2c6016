"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) over flattened, paged steps.

A step is a flat list of T tokens of many sequences (see attention.py for the
layout); every projection is a LoRALinear (q/k/v fused, gate/up fused) so tokens of
different adapters share one base matmul. Everything between the matmuls goes through
fused kernel ops (kernels.backend): residual add + RMSNorm, rope + KV-cache write,
SiLU-and-mul, a few launches per layer (each launch costs µs in a decode step). Numerics
follow transformers' modeling_llama (fp32 RMSNorm, fp32 rope angles cast to the model
dtype): the reference ops reproduce it exactly, so float32 logits match it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from inference_worker.attention import AttentionMeta, PagedAttention
from inference_worker.lora.layers import LoRALinear
from inference_worker.lora.metadata import LoraBatchMeta
from kernels.backend import KernelOps


@dataclass(frozen=True)
class LlamaSpec:
    """The geometry read from a transformers config (any of the supported families)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict                            # rope_parameters: rope_type, rope_theta, scaling fields
    tie_word_embeddings: bool
    qkv_bias: bool                        # Qwen2; Llama with attention_bias
    o_bias: bool                          # Llama with attention_bias
    mlp_bias: bool

    @classmethod
    def from_hf(cls, config) -> LlamaSpec:
        model_type = getattr(config, "model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r} (llama, mistral, qwen2)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
        attention_bias = bool(getattr(config, "attention_bias", False))
        max_len = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            max_len = min(max_len, window)   # no sliding-window attention here: stay inside the window
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads, num_kv_heads=num_kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps, max_position_embeddings=max_len, rope=rope,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)))


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """[D/2] float32 inverse frequencies: default, linear, or Llama 3.1 ("llama3") scaling."""
    rope, dim = spec.rope, spec.head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r} (default, linear, llama3)")
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm through the kernel ops, optionally fused with the residual add."""

    def __init__(self, size: int, eps: float, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x) [T, H]; with a residual: residual += x in place, then norm(residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, spec: LlamaSpec, ops: KernelOps) -> None:
        super().__init__()
        self.spec = spec
        self.ops = ops
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = LoRALinear(nn.Linear(spec.hidden_size, q_out + 2 * kv_out, bias=spec.qkv_bias),
                                   ("q_proj", "k_proj", "v_proj"), (q_out, kv_out, kv_out), ops)
        self.o_proj = LoRALinear(nn.Linear(q_out, spec.hidden_size, bias=spec.o_bias), ("o_proj",), (spec.hidden_size,), ops)
        self.attn = PagedAttention(ops, spec.num_heads, spec.num_kv_heads, spec.head_dim)

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor, lora: LoraBatchMeta,
                out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> attention inputs q [T, Hq, D], k, v [T, Hkv, D] (into `out` if given);
        k and v also written into the cache at slot_mapping."""
        spec = self.spec
        qkv = self.qkv_proj(x, lora)                                              # [T, q_out + 2 kv_out]
        # rotates q, k (cos/sin rows gathered by position in the op) and writes k, v into the cache
        return self.ops.rope_and_cache(qkv, positions, rope[0], rope[1], kv_cache[0], kv_cache[1], slot_mapping,
                                       spec.num_heads, spec.num_kv_heads, spec.head_dim, out=out)

    def output(self, attn_out: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        """Attention output [T, Hq, D] -> o_proj [T, hidden]."""
        return self.o_proj(attn_out.reshape(-1, self.spec.num_heads * self.spec.head_dim), lora)


class LlamaMLP(nn.Module):
    def __init__(self, spec: LlamaSpec, ops: KernelOps) -> None:
        super().__init__()
        inter = spec.intermediate_size
        self.ops = ops
        self.gate_up_proj = LoRALinear(nn.Linear(spec.hidden_size, 2 * inter, bias=spec.mlp_bias),
                                       ("gate_proj", "up_proj"), (inter, inter), ops, silu_mul=True)
        self.down_proj = LoRALinear(nn.Linear(inter, spec.hidden_size, bias=spec.mlp_bias), ("down_proj",),
                                    (spec.hidden_size,), ops)

    def forward(self, x: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_silu_mul(x, lora), lora)   # [T, hidden] -> [T, inter]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, ops: KernelOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.self_attn = LlamaAttention(spec, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.mlp = LlamaMLP(spec, ops)

    # A layer is split at its attention, so that a prompt step can run everything but attention
    # as CUDA graphs (inference_worker/prompt_graphs.py); the eager forward runs the same halves.
    def attention_inputs(self, h: torch.Tensor, pending: torch.Tensor | None, positions, rope, kv_cache,
                         slot_mapping: torch.Tensor, lora: LoraBatchMeta, out=None):
        """Residual stream h [T, hidden] and the previous layer's MLP output `pending` not yet
        added to it (None in the first layer; the add is fused with the norm, in place in h)
        -> this layer's q, k, v (LlamaAttention.project)."""
        x = self.input_layernorm(h) if pending is None else self.input_layernorm(pending, h)
        return self.self_attn.project(x, positions, rope, kv_cache, slot_mapping, lora, out=out)

    def attention_output(self, attn_out: torch.Tensor, h: torch.Tensor, lora: LoraBatchMeta) -> torch.Tensor:
        """Attention output [T, Hq, D] -> this layer's MLP output (the next layer's pending);
        o_proj's output is added into h."""
        x = self.post_attention_layernorm(self.self_attn.output(attn_out, lora), h)
        return self.mlp(x, lora)


@dataclass
class PieceBuffers:
    """What a prompt step's pieces pass each other (prompt_graphs.py): fixed tensors, so that a
    CUDA graph of a piece reads and writes the same addresses at every replay."""

    h: torch.Tensor                       # [T, hidden] residual stream
    pending: torch.Tensor                 # [T, hidden] the last layer's MLP output
    q: torch.Tensor                       # [T, Hq, D] a layer's attention inputs
    k: torch.Tensor                       # [T, Hkv, D]
    v: torch.Tensor                       # [T, Hkv, D]
    attn_out: torch.Tensor                # [T, Hq, D] a layer's attention output

    @classmethod
    def allocate(cls, spec: LlamaSpec, max_tokens: int, device, dtype) -> PieceBuffers:
        def zeros(*shape):
            return torch.zeros(max_tokens, *shape, device=device, dtype=dtype)
        hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        return cls(zeros(spec.hidden_size), zeros(spec.hidden_size), zeros(hq, d), zeros(hkv, d), zeros(hkv, d),
                   zeros(hq, d))

    def prefix(self, n: int) -> PieceBuffers:
        return PieceBuffers(*(getattr(self, f.name)[:n] for f in dataclasses.fields(self)))


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: LlamaSpec, ops: KernelOps) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, ops) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_cos: torch.Tensor | None = None         # [max_len, D] model dtype, set by init_rope
        self.rope_sin: torch.Tensor | None = None

    def init_rope(self, max_len: int) -> None:
        """Angles of every position once (fp32, as transformers), cast to the weights' dtype."""
        weight = self.embed_tokens.weight
        inv_freq = rope_inv_freq(self.spec).to(weight.device)
        freqs = torch.arange(max_len, device=weight.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)                               # [max_len, D]
        self.rope_cos, self.rope_sin = angles.cos().to(weight.dtype), angles.sin().to(weight.dtype)

    def lora_layers(self) -> list[tuple[int, LoRALinear]]:
        """(layer index, LoRALinear) of every LoRA-capable projection."""
        return [(i, m) for i, layer in enumerate(self.layers) for m in layer.modules() if isinstance(m, LoRALinear)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn: AttentionMeta, lora: LoraBatchMeta, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids/positions [T] -> logits [B, V] float32 at logits_indices [B] (one row per sequence)."""
        h = self.embed_tokens(input_ids)                  # [T, hidden] a fresh tensor: the layers add into it
        pending = None
        rope = (self.rope_cos, self.rope_sin)
        for layer, kv_cache in zip(self.layers, kv_caches):
            q, k, v = layer.attention_inputs(h, pending, positions, rope, kv_cache, attn.slot_mapping, lora)
            pending = layer.attention_output(layer.self_attn.attn.attend(q, k, v, *kv_cache, attn), h, lora)
        return self.logits(h, pending, logits_indices)

    def logits(self, h: torch.Tensor, pending: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        """The last layer's pending added, final norm, lm_head -> [B, V] float32 at logits_indices."""
        # norm is per token: only the rows that give logits (gathers are copies, safe to add into)
        return self.lm_head(self.norm(pending[logits_indices], h[logits_indices])).float()

    def run_piece(self, i: int, bufs: PieceBuffers, input_ids: torch.Tensor, positions: torch.Tensor,
                  kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor,
                  lora: LoraBatchMeta) -> None:
        """Piece i of num_layers + 1 of the forward between attention calls, over `bufs`: piece 0
        embeds and computes layer 0's q/k/v; piece i (0 < i < L) finishes layer i-1 (from its
        attention output in bufs.attn_out) and computes layer i's q/k/v; piece L finishes the
        last layer into bufs.pending. Attention i runs between pieces i and i+1 (the caller's)."""
        rope = (self.rope_cos, self.rope_sin)
        pending = None
        if i == 0:
            torch.index_select(self.embed_tokens.weight, 0, input_ids, out=bufs.h)   # = embed_tokens(ids)
        else:
            pending = self.layers[i - 1].attention_output(bufs.attn_out, bufs.h, lora)
        if i < len(self.layers):
            self.layers[i].attention_inputs(bufs.h, pending, positions, rope, kv_caches[i], slot_mapping, lora,
                                            out=(bufs.q, bufs.k, bufs.v))
        else:
            bufs.pending.copy_(pending)
