"""Generate through the real gRPC worker against a real store: exact vs transformers + peft."""
from __future__ import annotations

from protos import generate_pb2
from tests.worker.harness import run_concurrently, tokens_of

PROMPTS = ["The quick brown fox", "OpenLoRA serves thousands of", "A legal contract binds",
           "Once upon a time there", "def add(a, b):", "Die Straße ist"]
ID_PROMPTS = [[0, 45, 200, 17, 300, 12], [0, 7, 99, 401], [0, 250, 251, 252, 3, 60, 61, 62]]
BATCH_ADAPTERS = ["qv-r4", "all-r8", "kog-r16", "mlp-r2"]


def prompt_ids(worker, prompt):
    return prompt if isinstance(prompt, list) else worker.tokenizer(prompt)["input_ids"]


def test_concurrent_batch_matches_peft(worker, reference):
    """12 streams at once: 4 adapters (ranks 2..16, different module subsets) x 2, plus base."""
    cases = []
    for i, adapter in enumerate(BATCH_ADAPTERS * 2 + ["", "", "", ""]):
        prompt = PROMPTS[i % len(PROMPTS)] if i % 3 else ID_PROMPTS[i % len(ID_PROMPTS)]
        cases.append((prompt, adapter, 6 + i % 5))

    def call(prompt, adapter, n):
        kw = {"ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        return worker.generate(adapter=adapter, max_tokens=n, **kw)
    results = run_concurrently([lambda c=c: call(*c) for c in cases])
    for (prompt, adapter, n), messages in zip(cases, results):
        assert not isinstance(messages, Exception), f"{adapter or 'base'}: {messages}"
        expected = reference.greedy(prompt_ids(worker, prompt), n, adapter)
        assert tokens_of(messages) == expected, f"adapter {adapter or 'base'}, prompt {prompt!r}"
        last = messages[-1]
        assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == n
        assert last.usage.prompt_tokens == len(prompt_ids(worker, prompt))
        assert last.worker_id == "test-worker" and last.timings.total_ms > 0
    # adapters really change the output (else the comparison above proves little)
    base = reference.greedy(prompt_ids(worker, PROMPTS[0]), 8)
    assert sum(reference.greedy(prompt_ids(worker, PROMPTS[0]), 8, a) != base for a in BATCH_ADAPTERS) >= 3
    worker.wait_idle()


def test_text_prompt_gets_bos_like_the_tokenizer(worker, reference):
    ids = worker.tokenizer("The quick brown fox")["input_ids"]
    assert ids[0] == worker.tokenizer.bos_token_id
    by_text = worker.generate(prompt="The quick brown fox", adapter="all-r8")
    by_ids = worker.generate(ids=ids, adapter="all-r8")
    assert tokens_of(by_text) == tokens_of(by_ids) == reference.greedy(ids, 8, "all-r8")


def test_streaming_deltas_concatenate_to_the_full_text(worker):
    messages = worker.generate(prompt="Once upon a time", adapter="qv-r4", max_tokens=24)
    with_tokens = [m for m in messages if m.token_ids]
    assert len(with_tokens) >= 3, "tokens must stream as they are made, not in one message"
    text = "".join(m.text for m in messages)
    assert text == worker.tokenizer.decode(tokens_of(messages), skip_special_tokens=True)
    assert with_tokens[0].timings.first_token_ms > 0
    assert all(m.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_eos_stop_and_logprobs(worker):
    ids = worker.tokenizer("The quick brown fox")["input_ids"]
    free = tokens_of(worker.generate(ids=ids, max_tokens=6))
    stopped = worker.generate(ids=ids, max_tokens=6, stop_token_ids=[free[2]])
    assert stopped[-1].finish_reason == generate_pb2.FINISH_REASON_STOP
    k = free.index(free[2])                  # first occurrence of the stop token
    assert tokens_of(stopped) in (free[:k], free[:k + 1])   # with or without the stop token itself
    with_lp = worker.generate(ids=ids, max_tokens=3, logprobs=2)
    lps = [lp for m in with_lp for lp in m.logprobs]
    assert [lp.token_id for lp in lps] == free[:3]
    assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob for lp in lps)


def test_single_token(worker, reference):
    ids = ID_PROMPTS[0]
    assert tokens_of(worker.generate(ids=ids, adapter="mlp-r2", max_tokens=1)) == reference.greedy(ids, 1, "mlp-r2")


def test_merged_recipe_is_served_and_cached(worker):
    spec = generate_pb2.MergeSpec(merge_strategy="linear", adapters=[
        generate_pb2.MergeAdapter(adapter="attn-r8", weight=0.7), generate_pb2.MergeAdapter(adapter="qv-r8", weight=0.3)])
    ids = ID_PROMPTS[1]
    first = worker.generate(ids=ids, merge=spec)
    merged = [k for k in worker.status().cpu_adapters if k.startswith("merge:")]
    assert len(merged) == 1 and first[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert tokens_of(worker.generate(ids=ids, merge=spec)) == tokens_of(first)
    assert [k for k in worker.status().cpu_adapters if k.startswith("merge:")] == merged
    assert tokens_of(first) != tokens_of(worker.generate(ids=ids))


def test_stream_interval_groups_tokens_into_fewer_messages(worker, make_worker):
    """--stream-interval 3: the first token at once, then 3 tokens a message, the rest with the end;
    the same tokens, text, logprobs and usage as token-by-token streaming."""
    grouped = make_worker(worker={"stream_interval": 3})
    fields = {"prompt": "Once upon a time", "adapter": "qv-r4", "max_tokens": 11, "logprobs": 1}
    one_by_one, batched = worker.generate(**fields), grouped.generate(**fields)
    assert [len(m.token_ids) for m in batched if m.token_ids] == [1, 3, 3, 3, 1]
    assert tokens_of(batched) == tokens_of(one_by_one)
    assert "".join(m.text for m in batched) == "".join(m.text for m in one_by_one)
    assert [lp.token_id for m in batched for lp in m.logprobs] == tokens_of(one_by_one)
    assert batched[-1].finish_reason == one_by_one[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert batched[-1].usage.completion_tokens == 11 and batched[0].timings.first_token_ms > 0
