"""Adapter names and references: a strict pattern, so a name never becomes a path.

Name: optional `tenant/` prefix (lower case), then letters, digits and `-_.`.
Ref:  "name" (latest version) or "name@version" (version >= 1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from services.errors import InvalidArgument

NAME_RE = re.compile(r"^(?:[a-z0-9][a-z0-9._-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^[0-9]{1,10}$")
MAX_VERSION = 2**31 - 1


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f"bad adapter name {name!r}: use letters, digits and -_. (at most 128), optionally "
            "after a lower-case 'tenant/' prefix; no '..'")
    return name


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None  # None: the latest version

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_ref(ref: str) -> Ref:
    name, sep, version = ref.partition("@")
    if not sep:
        return Ref(check_name(name), None)
    if not _VERSION_RE.match(version) or not (1 <= int(version) <= MAX_VERSION):
        raise InvalidArgument(f"bad adapter reference {ref!r}: expected NAME or NAME@VERSION (VERSION >= 1)")
    return Ref(check_name(name), int(version))
