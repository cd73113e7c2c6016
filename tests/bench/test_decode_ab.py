"""bench/decode_ab.py: snapshots of the decode rules, and the committed ones of sessions 15 and 16 (CPU: configs only)."""
import importlib
import json

import torch


def test_snapshot_configs_reproduce_themselves():
    # imported in the test, not at collection: bench.decode_ab imports the Triton launchers, which must be
    # imported after the kernels' conftest picks the interpreter
    ab = importlib.import_module("bench.decode_ab")
    bk = importlib.import_module("bench.kernels")
    shrink_lc = importlib.import_module("kernels.sgmv_shrink").launch_config
    expand_lc = importlib.import_module("kernels.sgmv_expand").launch_config
    for path in (ab.BEFORE, "bench/results/decode-rules-s16.json"):
        with open(path) as f:
            snap = json.load(f)
        assert set(snap) == {f"{t}x{a}x{r}" for r in (16, 64, 8) for t, a in ab.CASES}
        for key, row in snap.items():
            tokens, adapters, rank = (int(n) for n in key.split("x"))
            for g, (h_in, widths) in bk.GROUPS.items():
                # given as overrides, a snapshot's configs launch exactly what they record
                s = shrink_lc(tokens, adapters, len(widths), rank, h_in, True, row["shrink"][g])
                e = expand_lc(tokens, adapters, sum(widths), rank, torch.bfloat16, row["expand"][g])
                assert {k: s[k] for k in row["shrink"][g]} == row["shrink"][g]
                assert {k: e[k] for k in row["expand"][g]} == row["expand"][g]
    with open(ab.BEFORE) as f:
        before = json.load(f)
    # today's rules where session 16 changed them
    now = ab.rules(256, 1, 64)
    assert (now["shrink"]["qkv"]["block_t"], before["256x1x64"]["shrink"]["qkv"]["block_t"]) == (64, 16)
    assert now["expand"]["gate_up"]["prefetch"] and not before["256x1x64"]["expand"]["gate_up"]["prefetch"]
    assert ab.rules(1, 1, 64)["expand"]["qkv"]["block_r"] == 64
    assert ab.rules(64, 8, 16)["expand"]["o"]["early_dot"] and not before["64x8x16"]["expand"]["o"]["early_dot"]
