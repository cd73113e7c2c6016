"""Drive an engine step by step and check it against transformers + peft."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from inference_worker.interfaces import EngineRequest, RequestOutput, SamplingConfig


@dataclass
class Result:
    outputs: list[RequestOutput] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)    # one [V] row per sampled token
    first_token_step: int | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def finished(self) -> RequestOutput | None:
        return self.outputs[-1] if self.outputs and self.outputs[-1].finished else None


class Driver:
    """Adds requests at chosen steps, steps the engine (no thread), collects outputs and logits."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.results: dict[str, Result] = {}
        self.step_index = 0
        self.max_running = 0                 # most sequences in one step
        engine.on_logits = lambda rid, row: self.results[rid].logits.append(row)

    def request(self, request_id: str, prompt: list[int], adapter: str = "", **sampling) -> EngineRequest:
        self.results[request_id] = Result()
        return EngineRequest(request_id, prompt, SamplingConfig(**sampling), adapter=adapter, on_output=self._on_output)

    def _on_output(self, out: RequestOutput) -> None:
        result = self.results[out.request_id]
        if out.token_ids and result.first_token_step is None:
            result.first_token_step = self.step_index
        result.outputs.append(out)

    def _settle_loads(self) -> None:
        """A load the scheduler polls is first let finish: the loader thread still issues it."""
        pool = self.engine.slot_pool
        is_loaded = pool.is_loaded

        def settled_is_loaded(key: str) -> bool:
            pool.settle()
            return is_loaded(key)
        pool.is_loaded = settled_is_loaded

    def run(self, arrivals: dict[int, list[EngineRequest]], max_steps: int = 400,
            idle_timeout_s: float = 60.0, settle_loads: bool = False) -> dict[str, Result]:
        """Steps until every request finished. A step that runs nothing (requests waiting for an
        adapter copy on the loader thread, say) sleeps briefly and does not count towards
        max_steps: busy-polling would spend the budget before a real load is done.
        settle_loads: an adapter load is done by the time the scheduler asks, so a loader thread's
        timing cannot change which sequences a step admits (a test that needs a given schedule)."""
        ran_steps, deadline = 0, time.monotonic() + idle_timeout_s
        self.step_index = 0
        if settle_loads:
            self._settle_loads()
        while ran_steps < max_steps and time.monotonic() < deadline:
            for request in arrivals.get(self.step_index, []):
                self.engine.add_request(request)
            ran = self.engine.step()
            self.max_running = max(self.max_running, self.engine.stats().running_requests)
            pending = any(k > self.step_index for k in arrivals)
            if not ran and not pending and all(r.finished for r in self.results.values()):
                return self.results
            self.step_index += 1
            if ran:
                ran_steps, deadline = ran_steps + 1, time.monotonic() + idle_timeout_s
            else:
                time.sleep(0.001)
        raise AssertionError(f"not finished after {ran_steps} steps that ran, or {idle_timeout_s} s without one")


class HFReference:
    """The base model and a PeftModel holding every adapter, float32."""

    def __init__(self, model_dir, adapter_dirs: dict) -> None:
        import transformers
        from peft import PeftModel

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = base
        for i, (ref, path) in enumerate(adapter_dirs.items()):
            if i == 0:
                self.model = PeftModel.from_pretrained(base, str(path), adapter_name=ref).eval()
            else:
                self.model.load_adapter(str(path), adapter_name=ref)

    @contextlib.contextmanager
    def _use(self, adapter: str):
        if not adapter:
            ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
            with ctx:
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    @torch.no_grad()
    def generate(self, adapter: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        with self._use(adapter):
            ids = torch.tensor([prompt])
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt):].tolist()

    @torch.no_grad()
    def step_logits(self, adapter: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), V]: the logits that chose each generated token."""
        with self._use(adapter):
            logits = self.model(input_ids=torch.tensor([prompt + generated])).logits[0]
        return logits[len(prompt) - 1: len(prompt) + len(generated) - 1].float()


def check_against_hf(ref: HFReference, requests: list[EngineRequest], results: dict[str, Result],
                     generate: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Greedy tokens identical and per-step logits close, request by request.

    generate=False checks the tokens teacher-forced (each is the argmax of the reference
    logits given the ones before: the same as greedy generation, one forward instead of many).
    """
    for req in requests:
        result = results[req.request_id]
        ours = result.token_ids
        want = ref.step_logits(req.adapter, req.prompt_token_ids, ours)
        expected = (ref.generate(req.adapter, req.prompt_token_ids, req.sampling.max_tokens) if generate
                    else want.argmax(-1).tolist())
        assert ours == expected, f"{req.request_id} ({req.adapter or 'base'}): tokens differ"
        got = torch.stack(result.logits)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                   msg=lambda m, req=req: f"{req.request_id} ({req.adapter or 'base'}): {m}")
