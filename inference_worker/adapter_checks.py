"""Does an adapter fit this worker's model? Checked once, before it enters the CPU tier.

Two checks, both FailedPrecondition (the request cannot run here, the adapter itself
is fine): the base model it was trained on, and its tensor shapes against the
model's projections (a rank-r adapter of module m is A [r, in_m], B [out_m, r]).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inference_worker.adapter_weights import AdapterWeights
from services.errors import FailedPrecondition


@dataclass(frozen=True)
class ModelShapes:
    num_layers: int
    modules: dict[str, tuple[int, int]]   # module name -> (in_features, out_features)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelShapes:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return cls(cfg.num_hidden_layers, {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        })


def base_model_name(model_dir: str | Path, explicit: str = "") -> str:
    """The worker's base model: explicit, else config.json's `_name_or_path`, else the dir name."""
    if explicit:
        return explicit
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("_name_or_path") or Path(model_dir).resolve().name)


def same_base_model(worker: str, adapter: str) -> bool:
    """Unknown on either side passes. Otherwise equal names, or equal last path parts.

    PEFT records the path or hub id the adapter was trained from
    ("/models/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B"); a worker serving a
    local copy of the same model names it by its dir. The shape check still guards
    the rest.
    """
    if not worker or not adapter:
        return True
    return worker == adapter or _last_part(worker) == _last_part(adapter)


def _last_part(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def check_base_model(worker: str, adapter: str, key: str) -> None:
    if not same_base_model(worker, adapter):
        raise FailedPrecondition(f"adapter {key} is for base model {adapter!r}; this worker serves {worker!r}")


def check_shapes(weights: AdapterWeights, shapes: ModelShapes, max_rank: int) -> None:
    for (layer, module), (a, b) in weights.modules.items():
        where = f"adapter {weights.key}: layer {layer} {module}"
        if layer >= shapes.num_layers:
            raise FailedPrecondition(f"{where}: the model has {shapes.num_layers} layers")
        in_f, out_f = shapes.modules[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FailedPrecondition(f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair")
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise FailedPrecondition(f"{where}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the model's "
                                     f"{in_f} -> {out_f} projection")
        if a.shape[0] > max_rank:
            raise FailedPrecondition(f"{where}: rank {a.shape[0]} > the worker's max LoRA rank {max_rank}")
