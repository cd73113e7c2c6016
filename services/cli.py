"""The `openlora` command: starts the services and talks to them.

Each service package owns its subcommand's flags (`<package>/cli.py` with
`add_arguments(parser)` and `run(args) -> int`), imported lazily so that
`openlora --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# Set by services/local_cluster.py: the pid of the process that started us; we ask Linux
# to SIGTERM us when it dies, so a killed `openlora up` (or test run) leaves no orphans.
DIE_WITH_PARENT_ENV = "OPENLORA_DIE_WITH_PARENT"

# subcommand -> (module with add_arguments/run, help)
_SUBCOMMANDS = {
    "store": ("adapter_store.cli", "run the adapter store service"),
    "worker": ("inference_worker.cli", "run an inference worker (one per GPU)"),
    "router": ("router.cli", "run a router"),
    "up": ("services.up", "start store, router and worker(s) locally on the embedded default"),
    "init-model": ("services.init_model_cli", "write a tiny Llama-family model directory"),
    "adapters": ("services.adapters_cli", "push, list, show, pull and delete adapters in the store"),
    "generate": ("services.generate_cli", "send a request through the router and stream the answer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openlora", description="OpenLoRA: serve many LoRA adapters of one base model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _die_with_parent() -> None:
    parent = os.environ.pop(DIE_WITH_PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):      # it died before prctl took effect
        sys.exit("parent process is gone")


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
