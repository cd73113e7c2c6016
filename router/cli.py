"""`openlora router --listen ADDR --workers ADDR[,ADDR...]|dns:///name:port`."""
from __future__ import annotations

import argparse

from router.config import RouterConfig
from services.logging_setup import setup_logging

_DEFAULTS = RouterConfig(workers="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=_DEFAULTS.listen, help="HOST:PORT (default %(default)s)")
    p.add_argument("--workers", required=True,
                   help="worker addresses HOST:PORT[,HOST:PORT...], or dns:///name:port for every "
                        "address the name resolves to (re-resolved periodically)")
    p.add_argument("--resolve-interval", type=float, default=_DEFAULTS.resolve_interval_s,
                   help="seconds between DNS re-resolutions (default %(default)s)")
    p.add_argument("--load-factor", type=float, default=_DEFAULTS.load_factor,
                   help="c of bounded-load hashing: a worker takes a request while its load "
                        "<= c x average (default %(default)s)")
    p.add_argument("--max-attempts", type=int, default=_DEFAULTS.max_attempts,
                   help="workers tried per request before its first token (default %(default)s)")
    p.add_argument("--grace", type=float, default=_DEFAULTS.grace_s,
                   help="seconds in-flight streams may finish on SIGTERM (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from router.server import RouterServer
    from services.telemetry import setup_telemetry

    setup_logging("openlora-router")
    config = RouterConfig(listen=args.listen, workers=args.workers, resolve_interval_s=args.resolve_interval,
                          load_factor=args.load_factor, max_attempts=args.max_attempts, grace_s=args.grace)
    telemetry = setup_telemetry("openlora-router")
    try:
        return RouterServer(config, telemetry=telemetry).serve_forever()
    finally:
        telemetry.shutdown()
