"""Group a request's engine outputs into fewer streamed messages (worker --stream-interval).

Why: every streamed message costs the worker process thread hand-offs (the engine thread wakes
the RPC thread, which waits for gRPC's send to complete) that contend with the engine thread
for the GIL. On the 2-core CPU host, 16 streams at one message per token cost the engine ~3 ms
of a 24 ms step; four tokens a message took gRPC from 502-523 to 551-569 tok/s, 0.83-0.86 to
0.93-0.94 x the in-process throughput (bench/results/serve-cpu.md). Off by default (one token,
one message); the first token and the final message always go out at once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from inference_worker.interfaces import RequestOutput


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens, text and logprobs in order; finish,
    usage and timings from the last (they only grow)."""
    if len(outputs) == 1:
        return outputs[0]
    return dataclasses.replace(outputs[-1], token_ids=[t for o in outputs for t in o.token_ids],
                               text="".join(o.text for o in outputs),
                               logprobs=[lp for o in outputs for lp in o.logprobs])


class StreamBatcher:
    """An on_output callback (runs on the engine thread) that hands `put` one merged output per
    `interval` tokens, the first token at once, and whatever is left when the request ends."""

    def __init__(self, put: Callable[[RequestOutput], None], interval: int) -> None:
        if interval < 1:
            raise ValueError(f"stream interval must be >= 1 token, got {interval}")
        self._put, self._interval = put, interval
        self._pending: list[RequestOutput] = []
        self._pending_tokens = 0
        self._sent_tokens = False

    def __call__(self, out: RequestOutput) -> None:
        self._pending.append(out)
        self._pending_tokens += len(out.token_ids)
        first = self._pending_tokens > 0 and not self._sent_tokens
        if out.finished or first or self._pending_tokens >= self._interval:
            self._put(merge_outputs(self._pending))
            self._sent_tokens = self._sent_tokens or self._pending_tokens > 0
            self._pending, self._pending_tokens = [], 0
