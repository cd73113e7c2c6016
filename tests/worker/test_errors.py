"""Status codes, cancellation and deadlines through the real gRPC worker."""
from __future__ import annotations

import threading

import grpc
import pytest

from protos import generate_pb2, inference_worker_pb2
from tests.store.harness import wait_for
from tests.worker.harness import StreamReader, code_of, request, run_concurrently, tokens_of

LONG = 1000         # tokens (seconds on a CPU): a request still running while the test acts on it


def long_request(worker, **kw):
    return worker.stub.Generate(request(prompt="Once upon a time", max_tokens=LONG, **kw), timeout=60)


@pytest.mark.parametrize("sampling", [{"top_p": 2.0}, {"temperature": -1.0}, {"top_k": 0, "logprobs": 21},
                                      {"repetition_penalty": 0.0}, {"stop": [""]}])
def test_bad_sampling_is_invalid_argument(worker, sampling):
    with pytest.raises(grpc.RpcError) as err:
        worker.generate(prompt="hi", **sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_prompts_are_invalid_argument(worker):
    too_long = [0] + [5] * worker.worker.engine.max_model_len
    for req in (request(ids=too_long), request(ids=[0, 10**6]), request(),
                request(prompt="x", adapter="qv-r4",
                        merge=generate_pb2.MergeSpec(adapters=[generate_pb2.MergeAdapter(adapter="a", weight=1)])),
                request(prompt="x", merge=generate_pb2.MergeSpec(adapters=[generate_pb2.MergeAdapter(adapter="a")]))):
        with pytest.raises(grpc.RpcError) as err:
            list(worker.stub.Generate(req, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req


def test_adapter_errors_leave_other_requests_unaffected(worker, reference):
    """Unknown, other-base and wrong-shape adapters fail alone; the requests beside them are exact."""
    ids = worker.tokenizer("A legal contract binds")["input_ids"]
    calls = [lambda a=a: worker.generate(ids=ids, adapter=a, max_tokens=12)
             for a in ("all-r8", "no-such-adapter", "other-base", "wrong-shape", "", "kog-r16")]
    results = run_concurrently(calls)
    assert [code_of(r) for r in results] == [None, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                             grpc.StatusCode.FAILED_PRECONDITION, None, None]
    assert "other-model" in results[2].details() and "wrong-shape" in results[3].details()
    for i, adapter in ((0, "all-r8"), (4, ""), (5, "kog-r16")):
        assert tokens_of(results[i]) == reference.greedy(ids, 12, adapter)
    worker.wait_idle()


def test_client_cancel_frees_blocks_and_slot(worker):
    worker.wait_idle()
    reader = StreamReader(long_request(worker, adapter="attn-r8"))
    reader.wait_for(lambda m: m.token_ids)
    busy = worker.status()
    assert busy.running_requests == 1 and busy.kv_blocks_used > 0 and "attn-r8@1" in busy.gpu_adapters
    reader.call.cancel()
    assert reader.done.wait(60)
    idle = worker.wait_idle()
    assert idle.free_adapter_slots == idle.total_adapter_slots    # the slot is unpinned (may stay resident)


def test_deadline_aborts_the_request(make_worker):
    """A request whose deadline passes while it waits (one seq at a time) is gone at once."""
    w = make_worker(max_num_seqs=1, max_num_batched_tokens=1024)
    running = StreamReader(long_request(w))
    running.wait_for(lambda m: m.token_ids)
    with pytest.raises(grpc.RpcError) as err:
        list(w.stub.Generate(request(prompt="hi", adapter="qv-r4"), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: w.status().waiting_requests == 0, "the expired request to leave the queue")
    running.call.cancel()
    w.wait_idle()


def test_queue_full_is_resource_exhausted(make_worker):
    w = make_worker(max_num_seqs=1, max_waiting=1, max_num_batched_tokens=1024)
    running = StreamReader(long_request(w))
    running.wait_for(lambda m: m.token_ids)
    waiting = StreamReader(long_request(w))
    wait_for(lambda: w.status().waiting_requests == 1, "the second request to wait")
    with pytest.raises(grpc.RpcError) as err:
        w.generate(prompt="hi")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.call.cancel()
    waiting.call.cancel()
    w.wait_idle()


def test_draining_refuses_new_requests(make_worker):
    w = make_worker()
    reader = StreamReader(w.stub.WatchStatus(inference_worker_pb2.WatchStatusRequest(interval_ms=50), timeout=60))
    reader.next()
    w.worker.servicer.drain()
    with pytest.raises(grpc.RpcError) as err:
        w.generate(prompt="hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reader.wait_for(lambda s: s.draining).draining
    assert reader.done.wait(60) and reader.error is None      # the watch ends after saying so



def test_drain_waits_for_running_requests_and_refuses_new_ones(make_worker):
    """The server's drain (SIGTERM) keeps answering while a Generate runs: status calls say draining, a new
    Generate gets the worker's own UNAVAILABLE (which routers retry; once grpc's stop begins, a call racing
    it may be cancelled instead); the drain ends once the running call does."""
    w = make_worker()
    running = StreamReader(long_request(w))
    running.wait_for(lambda m: m.token_ids)
    drain = threading.Thread(target=w.worker.server.drain, args=(60.0,), daemon=True)
    drain.start()
    wait_for(w.worker.servicer.intake.draining.is_set, "the drain to begin")
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            w.generate(prompt="hi")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert w.stub.GetStatus(inference_worker_pb2.GetStatusRequest(), timeout=10).draining
    assert drain.is_alive()                       # still waiting for the running request
    running.call.cancel()
    drain.join(30)
    assert not drain.is_alive()
