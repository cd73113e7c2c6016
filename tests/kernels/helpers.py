"""Random LoRA batches and error measures shared by the kernel tests and the benchmark."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute norm when ref is all zeros); NaN never passes."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def added_close(out: torch.Tensor, out0: torch.Tensor, ref: torch.Tensor, tol: float = 2e-2) -> bool:
    """An in-place add (out = out0 + delta) against its fp32 reference: the error within `tol` of
    the added part, plus the one rounding of out to its dtype (a small delta next to a large out0,
    e.g. a rank-1 adapter at a low scale, is otherwise lost in that rounding: a flaky test)."""
    err = (out.double() - ref.double()).norm().item()
    if err != err:                                  # NaN
        return False
    rounding = torch.finfo(out.dtype).eps * ref.double().norm().item()
    return err <= tol * (ref.double() - out0.double()).norm().item() + rounding


def make_meta(seg_lens: list[int], seg_slots: list[int], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    return (torch.tensor(indptr, dtype=torch.int32, device=device),
            torch.tensor(seg_slots, dtype=torch.int32, device=device), indptr[-1])


def make_pools(num_slots: int, num_mods: int, max_rank: int, h_in: int, n_out: int, ranks: list[int],
               dtype, device, gen: torch.Generator | None = None):
    """A [S, M, R, H_in], B [S, R, N] (rank-major) with random values (padding rows random too: kernels must ignore
    them), slot_ranks [S] int32, slot_scales [S] fp32."""
    a = (torch.randn(num_slots, num_mods, max_rank, h_in, generator=gen) / h_in ** 0.5).to(dtype).to(device)
    b = (torch.randn(num_slots, max_rank, n_out, generator=gen) / max_rank ** 0.5).to(dtype).to(device)
    slot_ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
    slot_scales = (torch.rand(num_slots, generator=gen) * 2 + 0.25).to(device)
    return a, b, slot_ranks, slot_scales
