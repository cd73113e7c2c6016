"""Disk tier: adapter blobs by sha256 under the worker's data dir, bounded by bytes.

Layout: `<root>/blobs/ab/abcdef…` (the path comes from the hash only) and
`<root>/tmp/<sha>.part` for downloads in progress. A blob enters `blobs/` only by
rename after its sha256 matched, so a crash leaves at most a `.part` file (which
the next download of that blob resumes). Blobs found from an earlier run are
re-hashed once before first use. Eviction removes the least recently used blobs
(mtime, bumped on every hit) that no reader holds.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskCache:
    def __init__(self, root: str | Path, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._verified: set[str] = set()      # hashed in this process
        self._readers: dict[str, int] = {}    # sha -> open holds (not evictable)
        self._sha_locks: dict[str, threading.Lock] = {}

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self._blobs / sha256[:2] / sha256

    @contextlib.contextmanager
    def hold(self, sha256: str, write: Callable[[Path], None] | None = None) -> Iterator[Path | None]:
        """The blob's path while the block runs (never evicted meanwhile); None on a miss.

        With `write`, a miss is filled first: `write(part_path)` writes (or resumes) the
        blob, then its hash is checked and it is renamed into place. One writer per
        blob at a time; a second caller waits and then finds it present. Raises
        ValueError when the written bytes do not hash to `sha256` (the part is removed).
        """
        path = self.blob_path(sha256)
        with self._lock:
            self._readers[sha256] = self._readers.get(sha256, 0) + 1
        try:
            if not self._check(sha256, path) and write is not None:
                self._fill(sha256, path, write)
                self.evict()
            yield path if path.exists() else None
        finally:
            with self._lock:
                self._readers[sha256] -= 1
                if not self._readers[sha256]:
                    del self._readers[sha256]

    def _fill(self, sha256: str, final: Path, write: Callable[[Path], None]) -> None:
        with self._sha_lock(sha256):
            if self._check(sha256, final):
                return
            part = self._tmp / f"{sha256}.part"
            write(part)
            actual = sha256_of(part)
            if actual != sha256:
                part.unlink(missing_ok=True)
                raise ValueError(f"downloaded blob hashes to {actual}, expected {sha256}")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            with self._lock:
                self._verified.add(sha256)

    def evict(self) -> list[str]:
        """Remove least recently used blobs until within budget. Returns their hashes."""
        entries = []
        for path in self._blobs.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path.name, path))
        total = sum(size for _, size, _, _ in entries)
        removed = []
        for _, size, sha, path in sorted(entries):
            if total <= self.budget_bytes:
                break
            with self._lock:
                if sha in self._readers:
                    continue
                path.unlink(missing_ok=True)
                self._verified.discard(sha)
            total -= size
            removed.append(sha)
        return removed

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self._blobs.glob("*/*"))

    def _check(self, sha256: str, path: Path) -> bool:
        """Present and intact; bumps the LRU time. A corrupt blob is removed (a miss)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        with self._lock:
            known = sha256 in self._verified
        if not known:
            if sha256_of(path) != sha256:
                path.unlink(missing_ok=True)
                return False
            with self._lock:
                self._verified.add(sha256)
        return True

    def _sha_lock(self, sha256: str) -> threading.Lock:
        with self._lock:
            return self._sha_locks.setdefault(sha256, threading.Lock())
