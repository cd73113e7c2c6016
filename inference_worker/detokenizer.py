"""Streaming detokenization: whole UTF-8 characters only, stop strings cut exactly.

Text of the newest tokens is decoded over a small window (vLLM's prefix/read offsets):
decode(window) minus decode(window without the new tokens) is the new text, held back
while it ends in U+FFFD (a byte-level token that splits a character). A few prompt tokens
start the window so tokenizers that render a leading space by context (SentencePiece)
decode the first output token as they would in the whole text.

Stop strings: text that could still become a stop string (a suffix that is a prefix of
one) is held back; when a stop string appears, the text before it is the last emitted
and the stop string itself is never emitted.
"""
from __future__ import annotations

_PROMPT_CONTEXT = 6     # prompt tokens decoded with the first outputs (leading-space rules)


def list_decoder(tokenizer):
    """tokenizer.decode for a list of ids, minus its input conversion: transformers' decode first
    runs to_py_obj (isinstance checks per element, for tensors and arrays), ~30 of a ~35 µs call
    on an H200 host (cProfile of bench/engine.py: 2 decodes a token, ~2 s of the engine thread
    per 65k tokens); for one list it then calls _decode with the same arguments (transformers
    4.x and 5.x). Tokenizers without _decode keep decode."""
    fast = getattr(tokenizer, "_decode", None)
    return fast if callable(fast) else tokenizer.decode


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self._decode_ids = list_decoder(tokenizer)
        self.stop = stop
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0                    # window start in _ids
        self._read_offset = len(self._ids)         # tokens before this are already in emitted text
        self._pending = ""                          # decoded, held back for stop strings
        self.stopped = False                        # a stop string was found: emit nothing more

    def add(self, token_id: int) -> str:
        """Append one output token; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""                               # an incomplete character (or nothing) so far
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(new_text[len(prefix_text):], final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is held back (a dangling partial character
        is emitted as U+FFFD, as tokenizer.decode of the whole output would show it)."""
        if self.stopped:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        tail = self._decode(self._prefix_offset, len(self._ids))[len(prefix_text):]
        self._read_offset = len(self._ids)
        return self._release(tail, final=True)

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._ids[start:end], skip_special_tokens=True)

    def _release(self, delta: str, final: bool) -> str:
        text = self._pending + delta
        if not self.stop:
            self._pending = ""
            return text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = 0 if final else self._stop_prefix_len(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that a stop string starts with."""
        for k in range(min(len(text), self._max_hold), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0
