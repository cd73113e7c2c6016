"""Incremental detokenizer: whole characters only, stop strings cut exactly."""
from __future__ import annotations

import pytest
import torch

from inference_worker.detokenizer import IncrementalDetokenizer, list_decoder


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(tokenizer, text: str, stop=(), prompt="Hi") -> tuple[list[str], IncrementalDetokenizer]:
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, tuple(stop))
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.parametrize("text", ["naïve café", "Grüße aus Köln 東京 Привет", "𝄞 ☃ 😀🙂 ü", "plain ascii text"])
def test_whole_characters_round_trip(tokenizer, text):
    deltas, _ = stream(tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_characters_split_across_tokens_are_held_back(tokenizer):
    text = "😀𝄞"                                   # not in the tokenizer's corpus: one token per byte
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 2                           # the characters really are split
    detok = IncrementalDetokenizer(tokenizer, [], ())
    deltas = [detok.add(t) for t in ids]
    assert deltas.count("") >= len(ids) - 2       # nothing emitted until a character is whole
    assert "".join(deltas) == text


@pytest.mark.parametrize("stop,expected", [
    (("the end",), "Once upon a time, "),
    (("time", "upon"), "Once "),                  # the earliest stop string wins
    ((" a t",), "Once upon"),                     # across token boundaries
    (("🙂",), "Once upon a time, the end 東京 "),
    (("nothing like this",), "Once upon a time, the end 東京 🙂 ok"),
])
def test_stop_strings_cut_exactly(tokenizer, stop, expected):
    deltas, detok = stream(tokenizer, "Once upon a time, the end 東京 🙂 ok", stop)
    assert "".join(deltas) == expected
    assert detok.stopped == (expected != "Once upon a time, the end 東京 🙂 ok")


def test_stop_prefix_is_held_then_released(tokenizer):
    deltas, detok = stream(tokenizer, "the cat then the dog", ("the end",))
    assert "".join(deltas) == "the cat then the dog" and not detok.stopped
    # text that might start the stop string was not emitted before it was decided
    emitted = ""
    for d in deltas[:-1]:
        emitted += d
        assert not emitted.endswith("the")


def test_nothing_after_stop(tokenizer):
    prompt_ids = tokenizer("x").input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, ("STOP",))
    out = [detok.add(t) for t in tokenizer("abc STOP def", add_special_tokens=False).input_ids]
    assert "".join(out) == "abc " and detok.stopped
    assert detok.add(tokenizer("more", add_special_tokens=False).input_ids[0]) == "" and detok.flush() == ""


def test_list_decoder_equals_decode(tokenizer):
    """The detokenizer's decode path (transformers' _decode, skipping decode's input conversion)
    gives tokenizer.decode's text for any ids, special tokens and partial characters included."""
    decode = list_decoder(tokenizer)
    assert decode is not tokenizer.decode                # the fast path is the one under test
    gen = torch.Generator().manual_seed(0)
    specials = list(tokenizer.all_special_ids)
    for n in (1, 2, 7, 40):
        for _ in range(25):
            ids = torch.randint(0, len(tokenizer), (n,), generator=gen).tolist()
            ids[0:0] = specials[: n % 3]
            for skip in (True, False):
                assert decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_list_decoder_falls_back_to_decode():
    class Plain:
        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

    assert list_decoder(Plain())([1, 2], skip_special_tokens=True) == "1,2"
