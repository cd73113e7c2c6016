"""Shared test helpers: tiny models and real PEFT adapters made on the spot."""
from __future__ import annotations

from pathlib import Path

from services.peft_adapter import make_adapter  # noqa: F401  (moved there: the demo uses it too)
from services.tiny_model import TinyModelConfig, init_model


def make_model(out_dir: Path, family: str = "llama", **overrides) -> Path:
    return init_model(out_dir, TinyModelConfig(family=family, **overrides))
