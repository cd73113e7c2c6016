"""StreamBatcher: engine outputs grouped into fewer streamed messages (worker --stream-interval)."""
from __future__ import annotations

import pytest

from inference_worker.interfaces import RequestOutput, TokenLogprobs
from inference_worker.stream_batch import StreamBatcher, merge_outputs


def out(tokens, text="", finished=False, reason="", total_ms=0.0):
    return RequestOutput("r", list(tokens), text, [TokenLogprobs(t, -0.5, []) for t in tokens], finished=finished,
                         finish_reason=reason, completion_tokens=0, total_ms=total_ms)


def test_first_token_at_once_then_every_interval_then_the_end():
    sent = []
    batch = StreamBatcher(sent.append, 3)
    batch(out([], ""))                         # nothing yet (e.g. an empty delta): held
    assert sent == []
    batch(out([1], "a"))                       # the first token: at once
    for t in (2, 3, 4, 5):
        batch(out([t], chr(96 + t)))
    batch(out([6], "f", finished=True, reason="length", total_ms=9.0))
    assert [m.token_ids for m in sent] == [[1], [2, 3, 4], [5, 6]]
    assert [m.text for m in sent] == ["a", "bcd", "ef"]
    assert sent[-1].finished and sent[-1].finish_reason == "length" and sent[-1].total_ms == 9.0
    assert [lp.token_id for lp in sent[1].logprobs] == [2, 3, 4]


def test_an_end_without_tokens_and_interval_one():
    sent = []
    batch = StreamBatcher(sent.append, 4)
    batch(out([], finished=True, reason="error"))
    assert len(sent) == 1 and sent[0].finish_reason == "error"
    one = []
    every = StreamBatcher(one.append, 1)
    for t in range(3):
        every(out([t]))
    assert [m.token_ids for m in one] == [[0], [1], [2]]
    with pytest.raises(ValueError, match=">= 1"):
        StreamBatcher(one.append, 0)


def test_merge_keeps_the_last_outputs_fields():
    merged = merge_outputs([out([1], "x"), out([2, 3], "yz", finished=True, reason="stop", total_ms=3.0)])
    assert merged.token_ids == [1, 2, 3] and merged.text == "xyz" and merged.finish_reason == "stop"
    assert merged.total_ms == 3.0 and len(merged.logprobs) == 3
