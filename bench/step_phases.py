"""Host time of each phase inside engine.step() (bench/engine.py's "host phases" lines).

Why: prompt-heavy (eager) steps take ~45-55 ms on the H200 even with few prompt tokens, about
twice their GPU span (bench/results/engine-h200-runs.md, run 14), and a profile of the model's
kernels does not say which host work fills the rest. Each phase wraps one engine call on the
instance (the engine calls them through self.*, so the wrappers see every call):

  schedule   scheduler.schedule()            (admission, adapter gate, block allocation)
  prepare    runner.prepare()                (the step's inputs and metadata, uploads)
  forward    runner.forward()                (launching the model: the whole forward when eager)
  sample     sampler.launch()                (sampling queued on the device)
  read_back  engine._read_back()             (waiting for the previous step's tokens, recording them)
  outputs    engine._send_outputs()          (detokenize, stop strings, callbacks)

"other" in the summary is the step's wall time minus these. The wrappers cost ~1 µs each.
`top_functions` reads a cProfile of a run (bench/engine.py --cprofile) down to its busiest functions.
"""
from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable

PHASES = ("schedule", "prepare", "forward", "sample", "read_back", "outputs")


class StepPhases:
    def __init__(self, engine) -> None:
        self._ms = dict.fromkeys(PHASES, 0.0)
        runner = engine.runner
        targets = {"schedule": (engine.scheduler, "schedule"), "prepare": (runner, "prepare"),
                   "forward": (runner, "forward"), "sample": (engine.sampler, "launch"),
                   "read_back": (engine, "_read_back"), "outputs": (engine, "_send_outputs")}
        for phase, (owner, attr) in targets.items():
            setattr(owner, attr, self._timed(phase, getattr(owner, attr)))

    def _timed(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._ms[phase] += (time.perf_counter() - start) * 1e3
        return timed

    def take(self) -> dict[str, float]:
        """The phases' ms since the last take (one engine.step())."""
        ms, self._ms = self._ms, dict.fromkeys(PHASES, 0.0)
        return ms


def top_functions(profile: cProfile.Profile, n: int) -> list[dict]:
    """The n functions with the most own time (the thread that profiled: the engine's, in bench/engine.py)."""
    stats = pstats.Stats(profile).stats                    # (file, line, name) -> (cc, calls, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [{"function": f"{file}:{line}({name})", "calls": calls, "tottime_s": round(tottime, 4),
             "cumtime_s": round(cumtime, 4)} for (file, line, name), (_, calls, tottime, cumtime, _) in rows]
