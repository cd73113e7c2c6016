"""Shared test helpers: tiny models and real PEFT adapters made on the spot."""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path

from services.peft_adapter import make_adapter  # noqa: F401  (moved there: the demo uses it too)
from services.tiny_model import TinyModelConfig, init_model


def make_model(out_dir: Path, family: str = "llama", **overrides) -> Path:
    return init_model(out_dir, TinyModelConfig(family=family, **overrides))


@contextmanager
def fresh_pg_schema(base_url: str, prefix: str = "t"):
    """A throwaway PostgreSQL schema; yields a URL whose connections all live in it."""
    from sqlalchemy import create_engine, text

    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
