"""LLMEngine behaviour through its thread: validation, streaming, stops, errors, abort, pins, stats."""
from __future__ import annotations

import threading

import pytest
import torch

from inference_worker.adapter_weights import AdapterWeights
from inference_worker.interfaces import EngineRequest, SamplingConfig
from services.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tests.engine.doubles import DirSource
from tests.engine.harness import Driver

WAIT_S = 60


class Stream:
    """Collects one request's outputs; done is set on the finished one."""

    def __init__(self) -> None:
        self.outputs, self.done = [], threading.Event()

    def __call__(self, out) -> None:
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def wait(self):
        assert self.done.wait(WAIT_S), "request did not finish"
        return self.outputs[-1]

    @property
    def token_ids(self):
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self):
        return "".join(o.text for o in self.outputs)


def submit(engine, rid, prompt, adapter="", **sampling) -> Stream:
    stream = Stream()
    sampling.setdefault("temperature", 0.0)
    engine.add_request(EngineRequest(rid, prompt, SamplingConfig(**sampling), adapter=adapter, on_output=stream))
    return stream


@pytest.fixture
def adapters(tiny_model_dir, adapter_factory):
    return {"a": adapter_factory(tiny_model_dir, rank=8, target_modules=("q_proj", "v_proj"), seed=11),
            "b": adapter_factory(tiny_model_dir, rank=4, target_modules=("o_proj",), seed=12),
            "c": adapter_factory(tiny_model_dir, rank=4, target_modules=("down_proj",), seed=13)}


def test_streams_and_accounts(tiny_model_dir, adapters, make_engine):
    engine = make_engine(tiny_model_dir, DirSource(adapters))
    engine.start()
    prompt = engine.tokenizer("The quick brown fox").input_ids
    streams = [submit(engine, f"r{i}", prompt, adapter=["", "a", "b"][i % 3], max_tokens=5 + i, ignore_eos=True)
               for i in range(6)]
    for i, s in enumerate(streams):
        last = s.wait()
        assert last.finish_reason == "length" and len(s.token_ids) == 5 + i
        assert all(len(o.token_ids) == 1 for o in s.outputs)           # one token per step, streamed
        assert last.prompt_tokens == len(prompt) and last.completion_tokens == 5 + i
        assert 0 <= last.queue_ms <= last.first_token_ms <= last.total_ms
        assert (last.adapter_load_ms > 0) == (i % 3 != 0)
        assert s.text == engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)
    stats = engine.stats()
    assert (stats.running_requests, stats.waiting_requests, stats.kv_blocks_used) == (0, 0, 0)
    assert sorted(stats.gpu_adapters) == ["a", "b"] and stats.free_adapter_slots == stats.total_adapter_slots


def test_add_request_validation(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir, max_model_len=32, max_waiting=2, num_kv_blocks=4, block_size=4)
    bad = [[], list(range(32)), [0, 512], [-1]]
    for prompt in bad:
        with pytest.raises(InvalidArgument):
            submit(engine, "x", prompt)
    with pytest.raises(InvalidArgument, match="KV cache"):       # 17 tokens > 4 blocks of 4
        submit(engine, "x", [5] * 17)
    submit(engine, "q1", [5, 6])
    with pytest.raises(InvalidArgument, match="in use"):
        submit(engine, "q1", [5, 6])
    submit(engine, "q2", [5, 6])
    with pytest.raises(ResourceExhausted):                         # not started: both still wait
        submit(engine, "q3", [5, 6])
    engine.stop()
    with pytest.raises(Unavailable):
        submit(engine, "q4", [5, 6])


def test_stop_cancels_everything(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir)
    streams = [submit(engine, f"r{i}", [5, 6, 7], max_tokens=50) for i in range(3)]
    engine.stop()
    assert all(s.wait().finish_reason == "cancelled" for s in streams)


def test_stop_tokens_eos_and_stop_strings(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir)
    engine.start()
    prompt = engine.tokenizer("Once upon a time").input_ids
    free = submit(engine, "free", prompt, max_tokens=12, ignore_eos=True)
    free.wait()
    tokens, text = free.token_ids, free.text
    # stop token id: the token is returned, its text is not
    s = submit(engine, "tok", prompt, max_tokens=12, ignore_eos=True, stop_token_ids=(tokens[3],))
    assert s.wait().finish_reason == "stop" and s.token_ids == tokens[: tokens.index(tokens[3]) + 1]
    # a stop string cut exactly, wherever the token boundaries are
    stop = text[5:9]
    s = submit(engine, "str", prompt, max_tokens=12, ignore_eos=True, stop=(stop,))
    assert s.wait().finish_reason == "stop" and s.text == text[: text.index(stop)]
    # eos (made one of the generated tokens here) ends it unless ignore_eos
    engine.eos_token_ids = frozenset({tokens[2]})
    s = submit(engine, "eos", prompt, max_tokens=12)
    assert s.wait().finish_reason == "eos" and s.token_ids == tokens[: tokens.index(tokens[2]) + 1]
    s = submit(engine, "ign", prompt, max_tokens=12, ignore_eos=True)
    assert s.wait().finish_reason == "length" and s.token_ids == tokens


def test_max_model_len_caps_output(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir, max_model_len=20)
    engine.start()
    s = submit(engine, "r", [5] * 15, max_tokens=100, ignore_eos=True)
    assert s.wait().finish_reason == "length" and len(s.token_ids) == 5


def test_adapter_errors_fail_only_their_request(tiny_model_dir, adapters, make_engine):
    wrong = AdapterWeights("wrong", "other", 4, 1.0, {(0, "q_proj"): (torch.zeros(4, 32), torch.zeros(64, 4))})
    engine = make_engine(tiny_model_dir, DirSource(adapters, weights={"wrong": wrong}))
    engine.start()
    prompt = [5, 6, 7]
    ok = submit(engine, "ok", prompt, adapter="a", max_tokens=4, ignore_eos=True)
    missing = submit(engine, "missing", prompt, adapter="nope")
    mismatch = submit(engine, "mismatch", prompt, adapter="wrong")
    last = missing.wait()
    assert last.finish_reason == "error" and isinstance(last.error, NotFound)
    last = mismatch.wait()
    assert last.finish_reason == "error" and isinstance(last.error, FailedPrecondition)
    assert ok.wait().finish_reason == "length" and len(ok.token_ids) == 4


def test_abort_frees_blocks_and_slot_at_once(tiny_model_dir, adapters, make_engine):
    engine = make_engine(tiny_model_dir, DirSource(adapters))
    first = threading.Event()
    stream = Stream()

    def on_output(out):
        stream(out)
        first.set()
    engine.add_request(EngineRequest("long", [5] * 20, SamplingConfig(max_tokens=400, ignore_eos=True),
                                     adapter="a", on_output=on_output))
    engine.start()
    assert first.wait(WAIT_S)
    assert engine.stats().kv_blocks_used > 0 and engine.stats().free_adapter_slots < engine.stats().total_adapter_slots
    engine.abort_request("long")
    stats = engine.stats()          # at once: no step needed
    assert stats.kv_blocks_used == 0 and stats.running_requests == 0
    assert stats.free_adapter_slots == stats.total_adapter_slots
    last = stream.wait()
    assert last.finish_reason == "cancelled" and len(stream.token_ids) < 400
    engine.abort_request("long")    # unknown/finished ids are ignored


def test_seeded_sampling_ignores_batch_companions(tiny_model_dir, make_engine):
    prompt = [5, 6, 7, 8]
    params = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 10, "ignore_eos": True}
    engine = make_engine(tiny_model_dir)
    engine.start()
    alone = submit(engine, "alone", prompt, **params)
    alone.wait()
    others = [submit(engine, f"o{i}", [9 + i] * (3 + i), temperature=0.8, max_tokens=12, ignore_eos=True)
              for i in range(4)]
    crowded = submit(engine, "crowded", prompt, **params)
    crowded.wait()
    for o in others:
        o.wait()
    assert alone.token_ids == crowded.token_ids
    other_seed = submit(engine, "other", prompt, **{**params, "seed": 99})
    other_seed.wait()
    assert other_seed.token_ids != alone.token_ids


def test_logprobs_stream(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir)
    driver = Driver(engine)
    req = driver.request("r", [5, 6, 7], max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    result = driver.run({0: [req]})["r"]
    for out, row in zip(result.outputs, result.logits):
        (lp,) = out.logprobs
        raw = row.log_softmax(-1)
        assert lp.token_id == out.token_ids[0] == lp.top[0][0]
        assert lp.logprob == pytest.approx(raw.max().item(), abs=1e-5) and len(lp.top) == 3


def test_pin_and_unpin_adapters(tiny_model_dir, adapters, make_engine):
    source = DirSource(adapters)
    engine = make_engine(tiny_model_dir, source, max_adapter_slots=2)
    engine.start()
    engine.pin_adapter(source.request("a")).result(WAIT_S)
    stats = engine.stats()
    assert stats.gpu_adapters == ["a"] and stats.free_adapter_slots == 1
    for i, name in enumerate(["b", "c", "b", "c"]):                # b and c share the other slot
        submit(engine, f"r{i}", [5, 6], adapter=name, max_tokens=2).wait()
    assert "a" in engine.stats().gpu_adapters and engine.slot_pool.num_evictions >= 2
    # every slot pinned: a third pin is refused; a request for c waits until a slot frees
    engine.pin_adapter(source.request("b")).result(WAIT_S)
    with pytest.raises(ResourceExhausted):
        engine.pin_adapter(source.request("c")).result(WAIT_S)
    with pytest.raises(NotFound):
        engine.pin_adapter(source.request("missing")).result(WAIT_S)
    assert engine.unpin_adapter("a") is True
    assert "a" not in engine.stats().gpu_adapters
    assert engine.unpin_adapter("a") is False
    # pin=False loads without pinning: evictable
    engine.pin_adapter(source.request("c"), pin=False).result(WAIT_S)
    assert sorted(engine.stats().gpu_adapters) == ["b", "c"] and engine.stats().free_adapter_slots == 1


def test_overlapped_outputs_leave_one_step_later(tiny_model_dir, make_engine):
    engine = make_engine(tiny_model_dir, overlap_outputs=True, async_scheduling=False)
    s = submit(engine, "r", [5, 6, 7], max_tokens=3, ignore_eos=True)
    engine.step()                       # prefill: token 1 recorded, its text waits for the next step
    assert s.outputs == []
    engine.step()                       # token 1 streamed while token 2 is computed
    assert len(s.token_ids) == 1
    engine.step()                       # token 3 hits the length: nothing left to run, all sent
    last = s.wait()
    assert last.finish_reason == "length" and len(s.token_ids) == 3
    assert engine.stats().kv_blocks_used == 0
    # a cancel while a token is unsent: the cancel is the only (final) output
    c = submit(engine, "c", [5, 6, 7], max_tokens=10, ignore_eos=True)
    engine.step()
    engine.abort_request("c")
    assert not engine.step()
    assert [(o.finish_reason, o.token_ids) for o in c.outputs] == [("cancelled", [])]
    assert engine.stats().kv_blocks_used == 0


def test_prefill_attention_gets_host_bounds(tiny_model_dir, make_engine):
    """The runner hands prefill attention its sequence bounds as host ints: reading cu_seqlens
    back would be a host sync in every layer of a prompt step on a GPU."""
    import dataclasses

    engine = make_engine(tiny_model_dir)
    calls = []
    for layer in engine.model.layers:
        attn = layer.self_attn.attn
        ref = attn.ops.prefill_attention

        def recording(q, k, v, cu_seqlens, scale, ref=ref, **hints):
            calls.append((cu_seqlens.tolist(), hints))
            return ref(q, k, v, cu_seqlens, scale, **hints)
        attn.ops = dataclasses.replace(attn.ops, prefill_attention=recording)
    for i, n in enumerate((5, 3, 7)):
        submit(engine, f"r{i}", [5 + j for j in range(n)], max_tokens=2)
    engine.step()
    assert calls and all(h == {"seq_bounds": [0, 5, 8, 15], "max_seqlen": 7} and b == [0, 5, 8, 15]
                         for b, h in calls)


def test_failed_background_slot_load_fails_only_its_request(tiny_model_dir, adapters, make_engine):
    """A copy into a device slot that fails in the loader thread ends that request with an error;
    requests in flight (and later loads into the same slot) go on."""
    from inference_worker.adapter_weights import load_peft_dir

    good = load_peft_dir(adapters["a"], "a")
    broken = load_peft_dir(adapters["a"], "broken")
    module, (a, b) = next(iter(broken.modules.items()))
    broken.modules[module] = (a.to("meta"), b)               # passes the shape checks, cannot be copied
    engine = make_engine(tiny_model_dir, DirSource({}, weights={"a": good, "broken": broken}),
                         adapter_load_thread=True, max_adapter_slots=2)
    engine.start()
    base = submit(engine, "base", [5, 6, 7], max_tokens=30, ignore_eos=True)
    bad = submit(engine, "bad", [5, 6, 7], adapter="broken", max_tokens=4)
    last = bad.wait()
    assert last.finish_reason == "error" and "device slot" in str(last.error)
    ok = submit(engine, "ok", [5, 6, 7], adapter="a", max_tokens=4, ignore_eos=True)
    assert ok.wait().finish_reason == "length" and len(ok.token_ids) == 4
    assert base.wait().finish_reason == "length" and len(base.token_ids) == 30


def test_a_burst_of_new_adapters_never_makes_a_step_wait_for_a_copy(tiny_model_dir, adapters, make_engine,
                                                                   monkeypatch):
    """More new adapters at once than the gate prefetches (cap 1 with 4 slots), copies slow on the
    loader thread: each request is admitted only once its adapter's copy is done, so no step waits
    for one (admitting at the cap with a plain load made a step wait behind the queued copies)."""
    import time

    from inference_worker.lora.slot_pool import SlotPool

    fill = SlotPool._fill

    def slow_fill(self, *args):
        time.sleep(0.05)
        return fill(self, *args)
    monkeypatch.setattr(SlotPool, "_fill", slow_fill)
    engine = make_engine(tiny_model_dir, DirSource(adapters), adapter_load_thread=True, max_adapter_slots=4)
    assert engine.slot_pool.loads_in_background
    streams = [submit(engine, f"r{i}", [5, 6, 7], adapter=name, max_tokens=3, ignore_eos=True)
               for i, name in enumerate(sorted(adapters))]
    deadline = time.monotonic() + 30
    while not all(s.outputs and s.outputs[-1].finish_reason for s in streams):   # steps idle while copies run
        assert time.monotonic() < deadline
        engine.step()
    assert all(s.outputs[-1].finish_reason == "length" for s in streams)
    assert engine.slot_pool.num_loads == len(adapters) and engine.slot_pool.num_step_waits == 0


def test_async_scheduling_reads_tokens_back_one_step_late(tiny_model_dir, make_engine):
    """Each step is launched before the previous one's tokens are read back; a sequence whose
    pending tokens end it is not scheduled again. Same tokens as the synchronous engine."""
    prompt = [5, 6, 7]
    sync_engine = make_engine(tiny_model_dir, async_scheduling=False)
    want = submit(sync_engine, "w", prompt, max_tokens=3, ignore_eos=True)
    while sync_engine.step():
        pass
    engine = make_engine(tiny_model_dir, async_scheduling=True, overlap_outputs=True)
    s = submit(engine, "r", prompt, max_tokens=3, ignore_eos=True)
    assert engine.step() and s.outputs == []            # the prefill is in flight
    assert engine.step() and len(s.token_ids) == 1      # decode 1 launched, then token 1 read back
    assert engine.step() and len(s.token_ids) == 2
    assert engine.step()                                # token 3 is pending: only a read-back
    assert s.outputs[-1].finish_reason == "length" and s.token_ids == want.token_ids
    assert not engine.step() and engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("fails", [False, True])
def test_kernel_warm_up_at_start(tiny_model_dir, make_engine, monkeypatch, fails):
    """With Triton kernels and warm_kernels, the engine compiles the eager LoRA variants at start for
    its token budget, sequence count and eager segment-table width; a failed warm-up only logs."""
    import dataclasses

    from inference_worker import engine as engine_mod
    from inference_worker.lora import warmup
    from kernels.backend import REFERENCE_OPS

    calls = []

    def warm(pool, max_tokens, max_segs, block_g, min_tokens):
        calls.append((pool, max_tokens, max_segs, block_g, min_tokens))
        if fails:
            raise RuntimeError("compile failed")
        return 0
    monkeypatch.setattr(warmup, "warm_lora_kernels", warm)
    monkeypatch.setattr(engine_mod, "get_ops", lambda device: dataclasses.replace(REFERENCE_OPS, name="triton"))
    engine = make_engine(tiny_model_dir, warm_kernels=True, max_num_seqs=6, max_model_len=256,
                         max_num_batched_tokens=512)
    assert calls == [(engine.slot_pool, 512, 6, 8, 0)] and engine.runner.eager_block_g == 8   # no prompt graphs
    engine.start()
    out = submit(engine, "r", engine.tokenizer("hello").input_ids, max_tokens=3, ignore_eos=True)
    assert out.wait().finish_reason == "length" and len(out.token_ids) == 3
    assert not make_engine(tiny_model_dir, max_num_seqs=6).config.warm_kernels   # CPU default: off
