"""Proto <-> engine dataclasses for the worker's Generate (no RPC flow here: see service.py).

Zero values of proto3 fields mean "the default", as protos/generate.proto documents;
the dataclasses validate (ValueError), which the servicer reports as INVALID_ARGUMENT.
"""
from __future__ import annotations

from inference_worker.interfaces import MergeRecipe, RequestOutput, SamplingConfig
from protos import generate_pb2 as gen
from services.errors import InvalidArgument

DEFAULT_MAX_TOKENS = 16

FINISH_REASONS = {
    "length": gen.FINISH_REASON_LENGTH,
    "stop": gen.FINISH_REASON_STOP,
    "eos": gen.FINISH_REASON_EOS,
    "cancelled": gen.FINISH_REASON_CANCELLED,
}


def sampling_from_proto(p: gen.SamplingParams) -> SamplingConfig:
    try:
        return SamplingConfig(
            max_tokens=p.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=p.temperature if p.HasField("temperature") else 1.0,
            top_p=p.top_p if p.HasField("top_p") else 1.0,
            top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
            logprobs=p.logprobs,
        )
    except ValueError as exc:
        raise InvalidArgument(f"sampling: {exc}") from None


def recipe_from_proto(m: gen.MergeSpec) -> MergeRecipe:
    """A validated recipe (merge.validate_recipe: InvalidArgument says what is wrong)."""
    from inference_worker.merge import validate_recipe

    missing = [a.adapter for a in m.adapters if not a.HasField("weight")]
    if missing:
        raise InvalidArgument(f"merge: weight missing for {', '.join(missing)}")
    recipe = MergeRecipe(
        adapters=tuple(a.adapter for a in m.adapters),
        weights=tuple(a.weight for a in m.adapters),
        strategy=m.merge_strategy or "linear",
        density=m.density if m.HasField("density") else None,
        majority_sign_method=m.majority_sign_method or "total",
        seed=m.seed,
        svd_rank=m.svd_rank,
    )
    validate_recipe(recipe)
    return recipe


def prompt_ids_from_proto(request: gen.GenerateRequest, tokenizer) -> list[int]:
    """Text is tokenized as the tokenizer does by default (BOS added); ids are used as given."""
    which = request.WhichOneof("prompt_input")
    if which == "prompt":
        return list(tokenizer(request.prompt)["input_ids"])
    if which == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    raise InvalidArgument("prompt or prompt_token_ids is required")


def response_from_output(out: RequestOutput, request_id: str, worker_id: str, tokenizer,
                         is_first_token: bool) -> gen.GenerateResponse:
    """One streamed message; usage and all timings on the last, first_token_ms with the first token."""
    msg = gen.GenerateResponse(request_id=request_id, text=out.text, token_ids=out.token_ids,
                               worker_id=worker_id)
    for lp in out.logprobs:
        msg.logprobs.append(gen.TokenLogprob(
            token_id=lp.token_id, logprob=lp.logprob,
            top=[gen.TopLogprob(token_id=t, logprob=v, token=tokenizer.decode([t])) for t, v in lp.top]))
    if is_first_token:
        msg.timings.first_token_ms = out.first_token_ms
    if out.finished:
        msg.finish_reason = FINISH_REASONS.get(out.finish_reason, gen.FINISH_REASON_UNSPECIFIED)
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = out.completion_tokens
        msg.timings.queue_ms = out.queue_ms
        msg.timings.adapter_load_ms = out.adapter_load_ms
        msg.timings.first_token_ms = out.first_token_ms
        msg.timings.total_ms = out.total_ms
    return msg
