"""`openlora adapters push|list|show|pull|rm`: manage adapters in the store."""
from __future__ import annotations

import argparse
import json
import sys
import time

from google.protobuf.json_format import MessageToDict

from services.config import DEFAULT_STORE
from services.errors import OpenLoRAError
from services.store_client import StoreClient

PROGRESS_MIN_BYTES = 8 << 20     # smaller pushes finish before a progress line would help
PROGRESS_EVERY_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store HOST:PORT (default: env OPENLORA_STORE, else "
                        f"{DEFAULT_STORE})")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    push = sub.add_parser("push", help="upload a PEFT adapter directory")
    push.add_argument("dir", help="directory with adapter_config.json and adapter_model.safetensors")
    push.add_argument("--name", required=True, help="[tenant/]name")
    push.add_argument("--base-model", default="", help="base model (default: from adapter_config.json)")
    push.add_argument("--description", default="")
    push.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    lst = sub.add_parser("list", help="list adapters (latest version of each name)")
    lst.add_argument("--base-model", default="")
    lst.add_argument("--prefix", default="", help="only names starting with this")
    lst.add_argument("--all-versions", action="store_true")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="show one adapter as JSON")
    show.add_argument("ref", help="NAME or NAME@VERSION")
    pull = sub.add_parser("pull", help="download an adapter into a PEFT directory")
    pull.add_argument("ref", help="NAME or NAME@VERSION")
    pull.add_argument("dir")
    rm = sub.add_parser("rm", help="delete NAME@VERSION, or every version of NAME")
    rm.add_argument("ref")


def _as_dict(adapter) -> dict:
    return MessageToDict(adapter, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--label expects KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


class _ProgressLine:
    """Rewrites one stderr line at most every PROGRESS_EVERY_S, for pushes and pulls of large files."""

    def __init__(self, verb: str, name: str):
        self.verb, self.name, self.last = verb, name, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total < PROGRESS_MIN_BYTES or (done < total and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        end = "\n" if done >= total else ""
        mib = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB"
        print(f"\r{self.verb} {self.name}: {mib} ({100 * done // total}%)", end=end, file=sys.stderr,
              flush=True)


def _print_table(adapters) -> None:
    rows = [("NAME", "VERSION", "BASE_MODEL", "RANK", "ALPHA", "SIZE", "SHA256", "CREATED")]
    for a in adapters:
        rows.append((a.name, str(a.version), a.base_model, str(a.rank), f"{a.lora_alpha:g}",
                     f"{a.size_bytes / 2**20:.1f}MiB", a.sha256[:12], a.created_at.ToJsonString()[:19]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


def _run(client: StoreClient, args: argparse.Namespace) -> None:
    if args.action == "push":
        a = client.upload(args.dir, args.name, base_model=args.base_model, description=args.description,
                          labels=_parse_labels(args.label), progress=_ProgressLine("pushing", args.name))
        print(f"{a.name}@{a.version} sha256={a.sha256} size={a.size_bytes}")
    elif args.action == "list":
        adapters = client.list(base_model=args.base_model, name_prefix=args.prefix,
                               all_versions=args.all_versions)
        if args.json:
            for a in adapters:
                print(json.dumps(_as_dict(a)))
        else:
            _print_table(adapters)
    elif args.action == "show":
        print(json.dumps(_as_dict(client.get(args.ref)), indent=2))
    elif args.action == "pull":
        a = client.pull(args.ref, args.dir, progress=_ProgressLine("pulling", args.ref))
        print(f"{a.name}@{a.version} sha256={a.sha256} -> {args.dir}")
    elif args.action == "rm":
        for a in client.delete(args.ref):
            print(f"deleted {a.name}@{a.version}")


def run(args: argparse.Namespace) -> int:
    with StoreClient(args.store) as client:
        try:
            _run(client, args)
        except OpenLoRAError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0
