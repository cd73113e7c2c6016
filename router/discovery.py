"""Which workers exist: a static list, or a DNS name re-resolved periodically.

`dns:///name:port` resolves to every address of the name (a compose service scaled
up, a Kubernetes headless service); re-resolving every few seconds is how the
router sees workers come and go. A failed resolution keeps the last known set:
a DNS hiccup must not take every worker out.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"

Resolver = Callable[[str, int], list[str]]   # (host, port) -> ["ip:port", ...]


@dataclass(frozen=True)
class WorkerSpec:
    static: tuple[str, ...] = ()     # HOST:PORT addresses, used as given
    dns_host: str = ""               # set for dns:///host:port
    dns_port: int = 0

    @property
    def is_dns(self) -> bool:
        return bool(self.dns_host)


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"worker address must be HOST:PORT, got {address!r}")
    return host, int(port)


def parse_workers(spec: str) -> WorkerSpec:
    """'' (none yet), 'a:1,b:2', or 'dns:///name:port'. Raises ValueError."""
    spec = spec.strip()
    if spec.startswith(DNS_PREFIX):
        host, port = _split_host_port(spec[len(DNS_PREFIX):])
        return WorkerSpec(dns_host=host, dns_port=port)
    addresses = tuple(a.strip() for a in spec.split(",") if a.strip())
    for address in addresses:
        _split_host_port(address)
    return WorkerSpec(static=tuple(dict.fromkeys(addresses)))


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as gRPC targets (IPv6 in brackets)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(set(out))


class Discovery:
    """Calls `on_change(addresses)` with the current worker set, now and on every change."""

    def __init__(self, spec: WorkerSpec, on_change: Callable[[list[str]], None],
                 interval_s: float = 5.0, resolver: Resolver = resolve_dns):
        self.spec = spec
        self._on_change = on_change
        self._interval_s = interval_s
        self._resolver = resolver
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: list[str] | None = None

    def start(self) -> None:
        self.refresh()
        if self.spec.is_dns:
            self._thread = threading.Thread(target=self._loop, name="discovery", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        if not self.spec.is_dns:
            addresses = list(self.spec.static)
        else:
            try:
                addresses = self._resolver(self.spec.dns_host, self.spec.dns_port)
            except OSError as exc:
                log.warning("cannot resolve %s: %s (keeping %s)", self.spec.dns_host, exc, self._current)
                return
        if addresses != self._current:
            log.info("workers: %s", ", ".join(addresses) or "none")
            self._current = addresses
            self._on_change(addresses)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.refresh()
