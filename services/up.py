"""`openlora up`: store, N workers and a router on this machine, until Ctrl-C/SIGTERM."""
from __future__ import annotations

import argparse
import signal
import time

from services.local_cluster import LocalCluster, LocalClusterConfig

_DEFAULTS = LocalClusterConfig(data_dir=".data")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="local inference workers (default %(default)s)")
    p.add_argument("--data", default=".data", help="data directory: store, worker caches, logs, model "
                                                   "(default %(default)s)")
    p.add_argument("--model", default=None, help="model directory (default: a tiny model made under --data)")
    p.add_argument("--router-port", type=int, default=_DEFAULTS.router_port, help="0: any free port")
    p.add_argument("--store-port", type=int, default=_DEFAULTS.store_port, help="0: any free port")
    p.add_argument("--worker-port", type=int, default=_DEFAULTS.worker_port,
                   help="first worker's port, the next ones follow (0: any free ports)")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt   # SIGTERM stops us like Ctrl-C: through the `finally` below


def print_addresses(cluster: LocalCluster) -> None:
    print(f"store   {cluster.store_address}")
    for i, address in enumerate(cluster.worker_addresses):
        print(f"worker  {address}  (worker-{i})")
    print(f"router  {cluster.router_address}", flush=True)


def run(args: argparse.Namespace) -> int:
    config = LocalClusterConfig(data_dir=args.data, model_dir=args.model, num_workers=args.workers,
                                router_port=args.router_port, store_port=args.store_port,
                                worker_port=args.worker_port)
    cluster = LocalCluster(config)
    for sig in (signal.SIGINT, signal.SIGTERM):   # SIGINT too: it may have been ignored (started with &)
        signal.signal(sig, _interrupt)
    try:
        print(f"starting store, {config.num_workers} worker(s) and a router "
              f"(logs in {config.data_dir / 'logs'}) ...", flush=True)
        cluster.start()
        print_addresses(cluster)
        print(f"ready: OPENLORA_ROUTER={cluster.router_address} OPENLORA_STORE={cluster.store_address} "
              "openlora generate 'Hello'   (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(0.5)
            dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
            if dead:
                print(f"{', '.join(dead)} exited (see logs); stopping", flush=True)
                return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):   # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        print("stopping ...", flush=True)
        cluster.stop()
        print("stopped", flush=True)
