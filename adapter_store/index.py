"""The SQL index: look up, list, add and delete `name@version` rows.

Version allocation is serialized by the database: the next version is max + 1 in a
transaction, and the unique constraints (name, version) and (name, sha256) turn a
race with another store process into an IntegrityError, after which we retry.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError

from adapter_store.db import AdapterRow, create_schema, make_engine, make_sessionmaker, utc_now
from adapter_store.names import Ref
from services.errors import InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_VERSION_ATTEMPTS = 8


@dataclass
class NewAdapter:
    """What an upload adds; the version and created_at are allocated by `add`."""
    name: str
    sha256: str
    size_bytes: int
    base_model: str
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    description: str
    labels: dict[str, str]


def _encode_token(name: str, version: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, version]).encode()).decode()


def _decode_token(token: str) -> tuple[str, int]:
    try:
        name, version = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(name, str) and isinstance(version, int):
            return name, version
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        pass
    raise InvalidArgument("bad page_token: pass back the next_page_token of a previous page")


class AdapterIndex:
    def __init__(self, db_url: str):
        self.engine = make_engine(db_url)
        create_schema(self.engine)
        self.Session = make_sessionmaker(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def get(self, ref: Ref) -> AdapterRow:
        query = select(AdapterRow).where(AdapterRow.name == ref.name)
        if ref.version is None:
            query = query.order_by(AdapterRow.version.desc()).limit(1)
        else:
            query = query.where(AdapterRow.version == ref.version)
        with self.Session() as session:
            row = session.scalar(query)
        if row is None:
            raise NotFound(f"adapter {ref} not found")
        return row

    def add(self, new: NewAdapter) -> tuple[AdapterRow, bool]:
        """Insert the next version of `new.name`, or return the version that already has
        this content. Returns (row, created)."""
        for _ in range(MAX_VERSION_ATTEMPTS):
            with self.Session() as session:
                existing = session.scalar(select(AdapterRow).where(
                    AdapterRow.name == new.name, AdapterRow.sha256 == new.sha256))
                if existing is not None:
                    return existing, False
                latest = session.scalar(
                    select(func.max(AdapterRow.version)).where(AdapterRow.name == new.name))
                row = AdapterRow(version=(latest or 0) + 1, created_at=utc_now(), **vars(new))
                session.add(row)
                try:
                    session.commit()
                    return row, True
                except IntegrityError:
                    session.rollback()    # another process took this version (or this content): look again
                    log.info("version race on %s: retrying", new.name)
        raise Unavailable(f"could not allocate a version of {new.name} (too many concurrent pushes); retry")

    def list_page(self, *, page_size: int = 0, page_token: str = "", base_model: str = "",
                  name_prefix: str = "", all_versions: bool = False) -> tuple[list[AdapterRow], str]:
        """One page ordered by (name, version). Without all_versions, the latest version of
        each name among the rows that match the filters. Returns (rows, next_page_token)."""
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        filters = []
        if base_model:
            filters.append(AdapterRow.base_model == base_model)
        if name_prefix:
            filters.append(AdapterRow.name.startswith(name_prefix, autoescape=True))
        query = select(AdapterRow).where(*filters)
        if not all_versions:
            latest = (select(AdapterRow.name, func.max(AdapterRow.version).label("version"))
                      .where(*filters).group_by(AdapterRow.name).subquery())
            query = query.join(latest, and_(AdapterRow.name == latest.c.name,
                                            AdapterRow.version == latest.c.version))
        if page_token:
            name, version = _decode_token(page_token)
            query = query.where(or_(AdapterRow.name > name,
                                    and_(AdapterRow.name == name, AdapterRow.version > version)))
        query = query.order_by(AdapterRow.name, AdapterRow.version).limit(page_size + 1)
        with self.Session() as session:
            rows = list(session.scalars(query))
        if len(rows) <= page_size:
            return rows, ""
        rows = rows[:page_size]
        return rows, _encode_token(rows[-1].name, rows[-1].version)

    def delete(self, ref: Ref) -> list[AdapterRow]:
        """Delete `name@version`, or every version of `name`. Returns the deleted rows."""
        where = [AdapterRow.name == ref.name]
        if ref.version is not None:
            where.append(AdapterRow.version == ref.version)
        with self.Session() as session:
            rows = list(session.scalars(select(AdapterRow).where(*where).order_by(AdapterRow.version)))
            if not rows:
                raise NotFound(f"adapter {ref} not found")
            session.execute(delete(AdapterRow).where(AdapterRow.id.in_([r.id for r in rows])))
            session.commit()
        return rows

    def is_referenced(self, sha256: str) -> bool:
        with self.Session() as session:
            query = select(AdapterRow.id).where(AdapterRow.sha256 == sha256).limit(1)
            return session.scalar(query) is not None

    def referenced_sha256(self) -> set[str]:
        with self.Session() as session:
            return set(session.scalars(select(AdapterRow.sha256).distinct()))
