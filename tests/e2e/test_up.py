"""`openlora up` starts store, worker and router, serves `openlora generate`, and stops cleanly."""
from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.healthcheck import check

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "services.cli"]


def lines_of(proc: subprocess.Popen) -> queue.Queue:
    out: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [out.put(line) for line in proc.stdout], daemon=True).start()
    return out


def read_until(lines: queue.Queue, marker: str, timeout: float = 240) -> str:
    seen = ""
    while marker not in seen:
        try:
            seen += lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {marker!r} within {timeout}s; got:\n{seen}") from None
    return seen


@pytest.mark.timeout(600)
def test_up_starts_serves_and_stops_cleanly(tmp_path, tiny_model_dir):
    proc = subprocess.Popen([*CLI, "up", "--workers", "1", "--data", str(tmp_path), "--model", str(tiny_model_dir),
                             "--router-port", "0", "--store-port", "0", "--worker-port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = read_until(lines_of(proc), "ready:")
        addresses = dict(re.findall(r"^(store|worker|router)\s+(\S+)", out, re.MULTILINE))
        assert all(check(a) == "SERVING" for a in addresses.values()), out
        gen = subprocess.run([*CLI, "generate", "Hello", "--router", addresses["router"], "--max-tokens", "5",
                              "--temperature", "0", "--ignore-eos"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert gen.returncode == 0, gen.stderr
        assert "[worker worker-0] 5 tokens, finish length" in gen.stderr and gen.stdout.strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert all(check(a) != "SERVING" for a in addresses.values())   # nothing left behind
    finally:
        if proc.poll() is None:            # a failed assertion: still stop the cluster through `up`
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
