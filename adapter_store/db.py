"""The index schema (SQLAlchemy 2) and the engine for SQLite or PostgreSQL.

One table, one row per `name@version`. Schema creation is explicit and idempotent
(`create_schema`); a future change adds a numbered step here rather than a framework.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_adapters_name_version"),
        # identical content under one name is one version (idempotent push, even across store replicas)
        UniqueConstraint("name", "sha256", name="uq_adapters_name_sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)   # blob key; refcount = rows with it
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(String(512), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    lora_alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    target_modules: Mapped[list] = mapped_column(JSON)               # ["q_proj", "v_proj"]
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict] = mapped_column(JSON)                       # {"k": "v"}
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def make_engine(db_url: str) -> Engine:
    if db_url.startswith("sqlite"):
        engine = create_engine(db_url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            # WAL: readers (Get/List/Download) never wait for the writer; FULL: a commit survives power loss
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()
        return engine
    return create_engine(db_url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def create_schema(engine: Engine) -> None:
    Base.metadata.create_all(engine)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    # expire_on_commit=False: rows are read after their session closed (converted to protos)
    return sessionmaker(engine, expire_on_commit=False)
