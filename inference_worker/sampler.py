"""Next-token choice for a batch of requests, each with its own SamplingConfig.

Order of processing (as transformers' logits processors and vLLM): repetition penalty
-> greedy argmax (temperature 0) or temperature -> top-k -> top-p -> draw. Each request
that gives a seed draws from its own torch.Generator, exactly V exponentials per token,
so its output depends only on its seed and its logits, never on its batch companions.

Logprobs are the RAW model distribution: log_softmax of the logits before penalty,
temperature, top-k and top-p (vLLM's default), for the chosen token and the top n.
"""
from __future__ import annotations

import torch

from inference_worker.interfaces import SamplingConfig, TokenLogprobs


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        # requests without a seed share one stream (reproducible per engine run, not per request)
        self.shared_generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingConfig],
                 generators: list[torch.Generator | None],
                 histories: list[list[int]]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [B, V] float32 (modified in place); histories[i]: prompt + output ids of row i
        (read only for a repetition penalty). Returns token ids [B] and logprobs per row."""
        return self.launch(logits, params, generators, histories).result()

    @torch.no_grad()
    def launch(self, logits: torch.Tensor, params: list[SamplingConfig], generators: list[torch.Generator | None],
               histories: list[list[int]]) -> SampledTokens:
        """Queue the sampling on the device and return at once (no host sync): the engine does
        host work while the GPU runs, then reads the tokens with `.result()`.

        Rows that share the engine's stream draw their noise in one call; a seeded row draws
        its V exponentials from its own generator.
        """
        num_rows = logits.shape[0]
        max_top = max((p.logprobs for p in params), default=0)
        raw_logprobs = logits.log_softmax(-1) if max_top else None        # [B, V] before any processing
        for i, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(logits[i], histories[i], p.repetition_penalty)
        token_ids = logits.argmax(-1)                                     # [B] greedy rows keep this
        sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        if sampled:
            every_row = len(sampled) == num_rows
            rows = None if every_row else to_device(sampled, torch.int64, logits.device)
            probs = processed_probs(logits if every_row else logits[rows], [params[i] for i in sampled])  # [Bs, V]
            noise = self._exponential_noise(probs, [generators[i] for i in sampled])
            # exponential race: argmax p / E with E ~ Exp(1) draws index v with probability p_v
            choice = (probs / noise).argmax(-1)
            if every_row:
                token_ids = choice
            else:
                token_ids[rows] = choice
        return SampledTokens(token_ids, raw_logprobs, [p.logprobs for p in params])

    def _exponential_noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """E ~ Exp(1) [Bs, V]: one draw from the shared stream for all unseeded rows, V draws
        from its own generator for each seeded row."""
        noise = torch.empty_like(probs)
        seeded = [j for j, g in enumerate(generators) if g is not None]
        if not seeded:
            noise.exponential_(generator=self.shared_generator)
        else:
            shared = [j for j, g in enumerate(generators) if g is None]
            if shared:
                draw = torch.empty((len(shared), probs.shape[1]), device=probs.device, dtype=probs.dtype)
                noise[to_device(shared, torch.int64, probs.device)] = draw.exponential_(generator=self.shared_generator)
            for j in seeded:
                noise[j].exponential_(generator=generators[j])
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)         # an exact 0 would make 0/0 = nan


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host sync (pinned staging, async copy on CUDA;
    a plain torch.tensor(..., device=cuda) waits for the stream)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def apply_repetition_penalty(row: torch.Tensor, history: list[int], penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor on one row [V], in place: every token seen
    in prompt + output has its logit divided by `penalty` if positive, multiplied if negative."""
    if not history:
        return
    ids = to_device(history, torch.long, row.device)
    score = row.gather(0, ids)
    row.scatter_(0, ids, torch.where(score < 0, score * penalty, score / penalty))


def processed_probs(logits: torch.Tensor, params: list[SamplingConfig]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (keep the smallest top set with mass >= p; at least
    one token), as probabilities [B, V] with removed tokens at 0. logits [B, V] float32."""
    temps = to_device([p.temperature for p in params], logits.dtype, logits.device)
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
    if all(p.top_k == 0 or p.top_k >= vocab for p in params) and all(p.top_p >= 1.0 for p in params):
        return logits.softmax(-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)                   # [B, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    top_k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int64, logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs                         # mass of better tokens
    top_p = to_device([p.top_p for p in params], logits.dtype, logits.device)
    sorted_probs = sorted_probs.masked_fill((mass_before >= top_p[:, None]) & (ranks > 0), 0.0)
    probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


class SampledTokens:
    """A step's sampled tokens, still on the device until `result()` (the step's one sync).

    On CUDA their copy to the host is queued at once, with an event: `result()` waits for
    this step only, even when the next step was queued after it (async scheduling).
    """

    def __init__(self, token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, num_logprobs: list[int]) -> None:
        self.token_ids = token_ids                    # [B] int64 on the device: the next step's inputs
        self._raw_logprobs, self._num_logprobs = raw_logprobs, num_logprobs
        self._host, self._copied = token_ids, None
        if token_ids.is_cuda:
            self._host = token_ids.to("cpu", non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    @torch.no_grad()
    def result(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """-> token ids [B] and, per row, the logprobs it asked for (None when it asked none)."""
        if self._copied is not None:
            self._copied.synchronize()
        ids = self._host.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(ids)
        if self._raw_logprobs is not None:
            raw = self._raw_logprobs
            top_values, top_ids = raw.topk(max(self._num_logprobs), dim=-1)
            chosen = raw.gather(1, self.token_ids[:, None])[:, 0].tolist()
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
            for i, n in enumerate(self._num_logprobs):
                if n:
                    logprobs[i] = TokenLogprobs(ids[i], chosen[i], list(zip(top_ids[i][:n], top_values[i][:n])))
        return ids, logprobs
