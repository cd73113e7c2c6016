"""Content-addressed blob files: blobs/ab/abcdef… (the full sha256 is the file name).

A blob appears only by rename of a complete, fsynced temp file (tmp/ is on the same
filesystem), so a crash leaves either no blob or a whole one; leftovers in tmp/ and
blobs no index row references are removed at startup (`cleanup`). The path comes
only from a validated hash, never from anything a user named.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path, tmp_dir: Path):
        self.root = Path(root)
        self.tmp_dir = Path(tmp_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    @contextmanager
    def temp_file(self, prefix: str) -> Iterator[Path]:
        """A fresh file in tmp/, removed on exit unless `place` moved it into blobs/."""
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=self.tmp_dir)
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def place(self, tmp_path: Path, sha256: str) -> bool:
        """Move a complete, fsynced temp file into place. False: the blob already existed."""
        final = self.path(sha256)
        if final.is_file():
            return False
        new_dir = not final.parent.is_dir()
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp_path, final)
        fsync_dir(final.parent)          # the rename itself is durable
        if new_dir:
            fsync_dir(self.root)         # and so is the new ab/ directory entry
        return True

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def all_sha256(self) -> Iterator[str]:
        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if _SHA256_RE.match(f.name) and f.name[:2] == sub.name:
                        yield f.name

    def cleanup(self, referenced: set[str]) -> tuple[int, int]:
        """Startup: drop temp files (interrupted uploads) and blobs no row references
        (a crash between rename and commit, or between row delete and unlink)."""
        num_tmp = 0
        for f in self.tmp_dir.iterdir():
            f.unlink(missing_ok=True)
            num_tmp += 1
        orphans = [sha for sha in self.all_sha256() if sha not in referenced]
        for sha in orphans:
            self.remove(sha)
        if num_tmp or orphans:
            log.warning("startup cleanup: removed %d temp files and %d unreferenced blobs",
                        num_tmp, len(orphans))
        return num_tmp, len(orphans)
