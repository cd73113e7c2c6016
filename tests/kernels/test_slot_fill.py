"""Staged adapter loads: the fill kernels against their reference, and a staged slot pool against
module-by-module copies (interpreted on CPU; at real sizes on a GPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from inference_worker.adapter_weights import AdapterWeights
from inference_worker.lora.layers import LoRALinear
from inference_worker.lora.slot_pool import SlotPool
from inference_worker.lora.staged_load import adapter_span
from kernels.backend import get_ops
from kernels.slot_fill import fill_slot, fill_slot_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_tables(gen: torch.Generator, src_len: int, num_rows: int, num_transposed: int):
    """Entries writing disjoint dst regions (laid out one after another), reading anywhere in src."""
    rows, transposed, end = [], [], 0
    for _ in range(num_rows):
        total = int(torch.randint(1, 3000, (1,), generator=gen))
        valid = int(torch.randint(0, total + 1, (1,), generator=gen))
        src = int(torch.randint(0, src_len - valid + 1, (1,), generator=gen))
        rows.append((src, end, valid, total))
        end += total + 3
    for _ in range(num_transposed):
        cols, n = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (300, 40))
        valid = int(torch.randint(0, n + 1, (1,), generator=gen))
        stride = cols + int(torch.randint(0, 50, (1,), generator=gen))
        src = int(torch.randint(0, src_len - cols * valid + 1, (1,), generator=gen))
        transposed.append((src, end, cols, valid, n, stride))
        end += n * stride + 5
    as_table = lambda entries, width: torch.tensor(entries, dtype=torch.int64).view(-1, width)  # noqa: E731
    return as_table(rows, 4), as_table(transposed, 6), end


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_fill_kernels_match_reference(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(20000, generator=gen).to(dtype)
    rows, transposed, dst_len = random_tables(gen, src.numel(), 5, 5)
    dst = torch.randn(dst_len, generator=gen).to(dtype)       # stale values: zeros must overwrite them
    expected = dst.clone()
    fill_slot_ref(src, expected, rows, transposed)
    out = dst.to(DEVICE)
    fill_slot(src.to(DEVICE), out, rows.to(DEVICE), transposed.to(DEVICE))
    assert torch.equal(out.cpu(), expected)


def test_fill_rejects_bad_tables():
    src, dst = torch.zeros(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    good = torch.zeros(0, 6, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[E, 4\] int64"):
        fill_slot(src, dst, torch.zeros(1, 3, dtype=torch.int64, device=DEVICE), good)
    with pytest.raises(ValueError, match="1-D"):
        fill_slot(src.view(2, 4), dst, torch.zeros(0, 4, dtype=torch.int64, device=DEVICE), good)


HIDDEN, KV = 24, 8
OUT = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}


def make_layers():
    ops = get_ops("cpu")
    layers = []
    for i in range(2):
        layers.append((i, LoRALinear(nn.Linear(HIDDEN, HIDDEN + 2 * KV), ("q_proj", "k_proj", "v_proj"),
                                     (HIDDEN, KV, KV), ops)))
        layers.append((i, LoRALinear(nn.Linear(HIDDEN, HIDDEN), ("o_proj",), (HIDDEN,), ops)))
    return layers


def split_buffers(adapter: AdapterWeights, parts: int, lead: int = 7) -> AdapterWeights:
    """The same weights as views of `parts` buffers (a blob read into pinned memory is a few),
    each starting `lead` elements in, as a blob's data section does."""
    keys = list(adapter.modules)
    modules = {}
    for i in range(parts):
        group = keys[i::parts]
        flat = torch.cat([adapter.modules[keys[0]][0].new_zeros(lead)] +
                         [t.reshape(-1) for k in group for t in adapter.modules[k]])
        offset = lead
        for k in group:
            pair = []
            for t in adapter.modules[k]:
                pair.append(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
            modules[k] = tuple(pair)
    return AdapterWeights(adapter.key, "m", adapter.rank, adapter.scaling, modules)


def one_buffer_adapter(key: str, ranks: dict[str, int], seed: int, dtype=torch.float32) -> AdapterWeights:
    """Every module's A [r, in] and B [out, r] as views of one buffer (what a blob read gives),
    module ranks as given (a rank pattern), modules not named absent."""
    gen = torch.Generator().manual_seed(seed)
    modules = {(layer, m): (torch.randn(r, HIDDEN, generator=gen).to(dtype), torch.randn(OUT[m], r, generator=gen).to(dtype))
               for layer in range(2) for m, r in ranks.items()}
    return split_buffers(AdapterWeights(key, "m", max(ranks.values()), 0.5 + seed, modules), 1)


@pytest.mark.parametrize("parts", [1, 3])
def test_adapter_span_stages_every_module(parts):
    adapter = split_buffers(one_buffer_adapter("a", {"q_proj": 4, "o_proj": 2}, 0), parts)
    span = adapter_span(adapter, torch.float32)
    assert len(span.chunks) == parts
    staged = torch.cat(span.chunks)
    for key, (a, b) in adapter.modules.items():
        a_off, b_off = span.offsets[key]
        assert torch.equal(staged[a_off: a_off + a.numel()].view_as(a), a)
        assert torch.equal(staged[b_off: b_off + b.numel()].view_as(b), b)
    assert adapter_span(adapter, torch.bfloat16) is None                     # not the pool's dtype
    transposed = AdapterWeights("t", "m", 4, 1.0, {k: (a, b.t().contiguous().t()) for k, (a, b) in adapter.modules.items()})
    assert adapter_span(transposed, torch.float32) is None                   # not contiguous


def test_staged_pool_matches_module_copies():
    """The same loads (ranks up and down, modules missing, per-module ranks, weights over several
    buffers or one tensor each, a dtype to convert, a reused slot) leave a staged pool and a
    copying pool equal."""
    staged = SlotPool(make_layers(), 2, 8, 16, torch.device(DEVICE), torch.float32, staged_loads=True)
    copied = SlotPool(make_layers(), 2, 8, 16, torch.device(DEVICE), torch.float32, staged_loads=False)
    loads = [
        one_buffer_adapter("r8", {"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8}, 1),
        one_buffer_adapter("r2-partial", {"q_proj": 2, "v_proj": 2}, 2),
        one_buffer_adapter("pattern", {"q_proj": 3, "k_proj": 6, "o_proj": 1}, 3),
        one_buffer_adapter("r8b", {"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8}, 4),
        one_buffer_adapter("r1", {"o_proj": 1}, 5),
    ]
    loads.append(split_buffers(one_buffer_adapter("split", {"q_proj": 5, "k_proj": 5, "o_proj": 5}, 6), 3))
    separate = one_buffer_adapter("sep", {"k_proj": 5, "o_proj": 5}, 7)     # a merge: one tensor each
    loads.append(AdapterWeights("sep", "m", 5, 1.5, {k: (a.clone(), b.clone()) for k, (a, b) in separate.modules.items()}))
    half = one_buffer_adapter("f16", {"q_proj": 3, "o_proj": 3}, 8, dtype=torch.float16)  # copied, converted
    loads.append(half)
    for i, adapter in enumerate(loads):
        for pool in (staged, copied):
            if i % 3 == 2:
                for key in pool.resident():
                    pool.evict_if_idle(key)
            assert pool.acquire(adapter.key, lambda a=adapter: a) is not None
            pool.release(adapter.key)                     # resident, evictable by the next load
        if DEVICE == "cuda":
            torch.cuda.synchronize()                      # the loads ran on the pools' copy streams
        for lin_s, lin_c in zip(staged.layers, copied.layers):
            assert torch.equal(lin_s.a_pool.cpu(), lin_c.a_pool.cpu()), adapter.key
            assert torch.equal(lin_s.b_pool.cpu(), lin_c.b_pool.cpu()), adapter.key
        assert torch.equal(staged.slot_ranks.cpu(), copied.slot_ranks.cpu())
        assert torch.equal(staged.slot_scales.cpu(), copied.slot_scales.cpu())
        assert staged.slot_of(adapter.key) == copied.slot_of(adapter.key)
    assert (staged.num_staged_loads, copied.num_staged_loads) == (len(loads) - 1, 0)   # "f16" copies


def test_warm_fill_touches_only_the_staging_region():
    pool = SlotPool(make_layers(), 2, 8, 16, torch.device(DEVICE), torch.float32, staged_loads=True)
    adapter = one_buffer_adapter("r8", {"q_proj": 8, "o_proj": 8}, 1)
    pool.acquire(adapter.key, lambda: adapter)
    before = pool._buffer.clone()
    pool._staging.fill_(5.0)
    pool.warm_fill()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    staged_at = pool._buffer.numel() - pool._staging.numel()
    assert torch.equal(pool._buffer[:staged_at], before[:staged_at])              # the slots untouched
    assert pool._staging[0].item() == 0 and torch.all(pool._staging[1:] == 5.0)
