"""What bench/engine.py runs on: model geometries, a model dir without weights, adapters made on the spot.

The model dir holds config.json (the geometry) and the tiny model's tokenizer
(services.tiny_model): the engine draws the weights on the device (random_weights)
and only token ids are used (ids past the tokenizer's vocab decode to nothing).

Adapters: random A/B on all 7 projections, bf16 in pinned CPU memory, served by an
in-memory AdapterSource whose tickets are ready at once (the real tiers are tested
elsewhere). Host memory is bounded: adapters of one rank share `distinct` weight
sets (adapter i uses set i % distinct), but every key has its own slot and is copied
to the device on its own, so loads, swaps and bytes read are as for distinct adapters.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from inference_worker.adapter_weights import AdapterWeights

GEOMETRIES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rope_theta=500000.0),
}
PROJECTIONS = {"q_proj": ("h", "q"), "k_proj": ("h", "kv"), "v_proj": ("h", "kv"), "o_proj": ("q", "h"),
               "gate_proj": ("h", "i"), "up_proj": ("h", "i"), "down_proj": ("i", "h")}


@dataclass(frozen=True)
class Workload:
    name: str
    num_adapters: int                     # 0 = base model only
    ranks: tuple[int, ...] = (16,)        # adapter i has rank ranks[i % len(ranks)]
    zipf_alpha: float = 0.0               # 0 = uniform popularity


WORKLOADS = {
    "S0": Workload("S0", 0),
    "S1": Workload("S1", 1),
    "S100": Workload("S100", 100),
    "S1000": Workload("S1000", 1000, ranks=(8, 16, 32, 64), zipf_alpha=1.0),
}


def projection_dims(geometry: str) -> dict[str, int]:
    """PROJECTIONS' dimension letters -> sizes: h hidden, i intermediate, q query heads, kv KV heads."""
    g = GEOMETRIES[geometry]
    head_dim = g["hidden_size"] // g["num_attention_heads"]
    return {"h": g["hidden_size"], "i": g["intermediate_size"], "q": g["num_attention_heads"] * head_dim,
            "kv": g["num_key_value_heads"] * head_dim}


def adapter_bytes(geometry: str, rank: int, element_size: int = 2) -> int:
    """A and B bytes of one adapter on all 7 projections of every layer."""
    dims = projection_dims(geometry)
    per_rank = sum(dims[i] + dims[o] for i, o in PROJECTIONS.values())
    return GEOMETRIES[geometry]["num_hidden_layers"] * per_rank * rank * element_size


def make_model_dir(geometry: str, out: Path) -> Path:
    """config.json of the geometry + the tiny model's tokenizer files (no weights needed)."""
    import transformers

    from services.tiny_model import init_model

    init_model(out)
    geom = dict(GEOMETRIES[geometry])
    rope = geom.pop("rope_scaling", None) or {"rope_type": "default"}
    rope["rope_theta"] = geom.pop("rope_theta")
    config = transformers.LlamaConfig(**geom, rope_parameters=rope, rms_norm_eps=1e-5,
                                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    config.save_pretrained(out)
    (out / "model.safetensors").unlink(missing_ok=True)       # the tiny weights: not this geometry
    (out / "bench_geometry.json").write_text(json.dumps({"geometry": geometry}))
    return out


class _Ticket:
    def __init__(self, key: str, make) -> None:
        self.key, self._make = key, make

    def ready(self) -> bool:
        return True

    def error(self):
        return None

    def weights(self) -> AdapterWeights:
        return self._make(self.key)

    def wait(self, timeout: float | None = None) -> bool:
        return True


def _parse(key: str) -> tuple[Workload, int]:
    name, index = key.split("/")
    return WORKLOADS[name], int(index)


def rank_of(key: str) -> int:
    workload, index = _parse(key)
    return workload.ranks[index % len(workload.ranks)]


class BenchAdapterSource:
    """AdapterSource over the workloads' adapters "<workload>/<i>"; weights made once per (rank, set)."""

    def __init__(self, geometry: str, distinct: int, pin: bool, device: torch.device) -> None:
        self.geometry, self._dims = geometry, projection_dims(geometry)
        self.num_layers = GEOMETRIES[geometry]["num_hidden_layers"]
        self.distinct, self.pin, self.device = distinct, pin, device
        self._sets: dict[tuple[int, int], dict] = {}

    def adapter_bytes(self, key: str, element_size: int = 2) -> int:
        """What a step reads of an adapter."""
        return adapter_bytes(self.geometry, rank_of(key), element_size)

    def _module_set(self, rank: int, which: int) -> dict:
        """All modules' A [r, in] and B [out, r] as views of one (pinned) buffer, drawn on the device."""
        key = (rank, which)
        if key not in self._sets:
            shapes = [((layer, name), (rank, self._dims[i]), (self._dims[o], rank))
                      for layer in range(self.num_layers) for name, (i, o) in PROJECTIONS.items()]
            total = sum(a[0] * a[1] + b[0] * b[1] for _, a, b in shapes)
            gen = torch.Generator(device=self.device).manual_seed(1000 * rank + which)
            flat = torch.empty(total, dtype=torch.bfloat16, pin_memory=self.pin)
            flat.copy_((torch.randn(total, device=self.device, generator=gen) * 0.02).to(torch.bfloat16))
            modules, offset = {}, 0
            for mkey, a_shape, b_shape in shapes:
                a = flat[offset: offset + a_shape[0] * a_shape[1]].view(a_shape)
                offset += a.numel()
                b = flat[offset: offset + b_shape[0] * b_shape[1]].view(b_shape)
                offset += b.numel()
                modules[mkey] = (a, b)
            self._sets[key] = modules
        return self._sets[key]

    def prepare(self, workload: Workload) -> None:
        """Make the weight sets a workload uses now (before its clock starts)."""
        for index in range(min(workload.num_adapters, self.distinct * len(workload.ranks))):
            self._module_set(workload.ranks[index % len(workload.ranks)], index % self.distinct)

    def _make(self, key: str) -> AdapterWeights:
        _, index = _parse(key)
        rank = rank_of(key)
        return AdapterWeights(key, "bench", rank, 2.0, self._module_set(rank, index % self.distinct))

    def request(self, ref: str) -> _Ticket:
        return _Ticket(ref, self._make)

    def request_merge(self, spec):
        raise NotImplementedError("no merges in the benchmark")

    def cpu_resident(self) -> list[str]:
        return []


def adapter_sequence(workload: Workload, num_requests: int, seed: int) -> list[str]:
    """The adapter ref of each request ("" = base): uniform, or Zipf(alpha) over ranks 1..n."""
    rng = random.Random(seed)
    n = workload.num_adapters
    if n == 0:
        return [""] * num_requests
    if not workload.zipf_alpha:
        return [f"{workload.name}/{rng.randrange(n)}" for _ in range(num_requests)]
    weights = [1.0 / (k + 1) ** workload.zipf_alpha for k in range(n)]
    return [f"{workload.name}/{i}" for i in rng.choices(range(n), weights=weights, k=num_requests)]


def random_prompts(vocab_size: int, num_requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Each request's prompt: prompt_len token ids drawn uniformly (the same for the same seed)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(num_requests)]
