"""Registers and spills of the LoRA kernels compiled for sm_90 (H100/H200), no GPU needed.

Compiles each kernel variant with triton.compile for a CUDA target (triton ships ptxas and
cuobjdump) and prints registers per thread, local-memory stack (spills) and shared memory:
catches compile errors of GPU-only code paths (PDL, the fused decode kernel) and shows register
pressure before spending device time. The local triton may differ from the GPU host's.

Usage: python bench/kernel_regs.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.lora_decode import _lora_decode_kernel  # noqa: E402
from kernels.lora_silu_mul import _lora_silu_mul_kernel  # noqa: E402
from kernels.sgmv_expand import _sgmv_expand_kernel  # noqa: E402
from kernels.sgmv_shrink import _sgmv_shrink_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(kernel, ptrs, consts, num_warps=4, num_stages=3, **opts):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        else:
            sig[name] = "i32"
    # as the JIT specializes them at run time: pointers and ints (but T, G) divisible by 16 (the
    # Llama shapes are), so loads vectorize as they do on the GPU
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in consts and name not in ("T", "G")}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    ck = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages, **opts})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in res.splitlines() if "REG:" in ln), "")
    regs = line.split("REG:")[1].split()[0] if line else "?"
    stack = line.split("STACK:")[1].split()[0] if "STACK:" in line else "?"
    return regs, stack, ck.metadata.shared


SH_PTRS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "y_ptr": "*fp32", "indptr_ptr": "*i32", "slots_ptr": "*i32",
           "ranks_ptr": "*i32"}
EX_PTRS = {"y_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16", "indptr_ptr": "*i32", "slots_ptr": "*i32",
           "ranks_ptr": "*i32", "scales_ptr": "*fp32"}
LD_PTRS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "indptr_ptr": "*i32",
           "slots_ptr": "*i32", "ranks_ptr": "*i32", "scales_ptr": "*fp32"}
SM_PTRS = {"y_ptr": "*fp32", "b_ptr": "*bf16", "gu_ptr": "*bf16", "out_ptr": "*bf16", "indptr_ptr": "*i32",
           "slots_ptr": "*i32", "ranks_ptr": "*i32", "scales_ptr": "*fp32"}


def main() -> int:
    cases = []
    for rb in (16, 64):
        for pdl, early in ((False, False), (True, False), (True, True)):
            for bk in (512, 1024):
                cases.append((f"shrink decode R64 RB{rb} bk{bk} pdl{pdl} early{early}", _sgmv_shrink_kernel, SH_PTRS,
                              dict(R=64, RB=rb, BLOCK_G=128, BLOCK_T=1, BLOCK_N=4, BLOCK_K=bk, SPLIT_K=1,
                                   USE_DOT=False, ATOMIC=False, CAN_SKIP=True, IEEE=False, PDL=pdl, EARLY=early), {}, 4))
            if early:
                continue                                        # (prompt tiles never read early)
            cases.append((f"shrink dot R64 RB{rb} pdl{pdl}", _sgmv_shrink_kernel, SH_PTRS,
                          dict(R=64, RB=rb, BLOCK_G=16, BLOCK_T=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, USE_DOT=True,
                               ATOMIC=True, CAN_SKIP=rb >= 64, IEEE=False, PDL=pdl, EARLY=False), {}, 4))
    for bt, bn, split in ((64, 64, 8), (128, 32, 16)):          # long segments: wide dot tiles
        cases.append((f"shrink dot wide R64 bt{bt} bn{bn} split{split}", _sgmv_shrink_kernel, SH_PTRS,
                      dict(R=64, RB=64, BLOCK_G=128, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, USE_DOT=True,
                           ATOMIC=True, CAN_SKIP=True, IEEE=False, PDL=True, EARLY=False), {"num_stages": 3}, 4))
    for bn, split in ((16, 8), (32, 16), (64, 4)):              # decode dot tiles past rank 16: one wave
        cases.append((f"shrink dot decode R64 bn{bn} split{split}", _sgmv_shrink_kernel, SH_PTRS,
                      dict(R=64, RB=64, BLOCK_G=128, BLOCK_T=16, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, USE_DOT=True,
                           ATOMIC=True, CAN_SKIP=True, IEEE=False, PDL=True, EARLY=False), {"num_stages": 4}, 4))
    # (token tile, columns, rank rows, blocks a program, warps, tl.dot, early, prefetch, early_dot): the decode
    # defaults before and with early weights (one warp per 256 columns), 2-token tiles, prefill, dot tiles with the
    # next column block's loads in flight (past rank 16: one 64-row step; 1-token tiles' early reads in 16-row
    # steps, or all 64 rows), and with their first B block read early; 128- and 256-token tiles (long segments)
    expands = ((1, 256, 16, 2, 8, False, False, False, False), (1, 1024, 8, 2, 4, False, False, False, False),
               (2, 512, 16, 1, 4, False, False, False, False), (64, 256, 16, 1, 4, True, False, False, False),
               (1, 512, 8, 1, 2, False, True, False, False), (1, 1024, 8, 2, 4, False, True, False, False),
               (16, 128, 16, 4, 4, True, False, True, False), (32, 256, 16, 2, 4, True, False, True, False),
               (16, 256, 64, 1, 4, True, False, True, False), (1, 512, 16, 1, 2, False, True, False, False),
               (1, 128, 64, 1, 2, False, True, False, False), (16, 256, 16, 1, 4, True, False, True, True),
               (16, 256, 64, 1, 4, True, False, True, True), (128, 64, 64, 1, 8, True, False, True, True),
               (256, 64, 16, 1, 8, True, False, False, False))
    for pdl in (False, True):
        for bt, bn, br, nbp, nw, dot, early, pre, early_dot in expands:
            cases.append((f"expand bt{bt} bn{bn} br{br} nbp{nbp} pdl{pdl} early{early} pre{pre} ed{early_dot}",
                          _sgmv_expand_kernel, EX_PTRS,
                          dict(R=64, BLOCK_G=128, BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=br, NB_PER_PROG=nbp, USE_DOT=dot,
                               IEEE=False, PDL=pdl, EARLY=early, PREFETCH=pre, EARLY_DOT=early_dot), {}, nw))
    for rb in (16, 32):
        for bt in (1, 2):
            blk = max(64, 8192 // (rb * bt))
            cases.append((f"lora_decode RB{rb} bt{bt} blk{blk}", _lora_decode_kernel, LD_PTRS,
                          dict(R=64, M=3, RB=rb, CHUNK=2048, BLOCK_G=128, BLOCK_T=bt, BLOCK_K=blk, BLOCK_N=blk), {}, 8))
    for bt, bn, nw, one in ((64, 128, 4, False), (64, 256, 8, False), (32, 128, 4, False), (16, 128, 4, True), (32, 128, 4, True)):
        cases.append((f"lora_silu_mul bt{bt} bn{bn} w{nw} one_step{one}", _lora_silu_mul_kernel, SM_PTRS,
                      dict(R=64, BLOCK_G=128, BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=16, IEEE=False, ONE_STEP=one),
                      {"num_stages": 2}, nw))
    ok = True
    for name, k, ptrs, consts, opts, nw in cases:
        try:
            regs, spills, smem = compile_one(k, ptrs, consts, num_warps=nw, **opts)
            print(f"OK   {name:45s} regs {regs} stack {spills} smem {smem}")
        except Exception as exc:
            ok = False
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}")
    print("all ok" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
