"""bench/decode_ab.py's "before": the decode rules before session 15, as they were (CPU: configs only)."""
import importlib


def test_before_is_the_session_14_rule():
    # imported in the test, not at collection: bench.decode_ab imports the Triton launchers, which must be
    # imported after the kernels' conftest picks the interpreter
    before = importlib.import_module("bench.decode_ab").before
    assert before(64, 64, 16) == ({}, {})                        # 1-token tiles at rank 16: unchanged
    assert before(1, 1, 64) == ({}, {g: {"early": False} for g in ("qkv", "o", "gate_up", "down")})
    shrink, expand = before(64, 8, 16)                            # dot tiles at rank 16: PDL was off
    assert "qkv" not in shrink and shrink["down"] == {"pdl": False} and expand["qkv"] == {"pdl": False}
    shrink, expand = before(64, 8, 64)                            # rank 64: 2-token shrinks, 16-row expands
    assert shrink["qkv"] == {"block_t": 2} and shrink["down"]["block_t"] == 16 and shrink["down"]["split_k"] == 16
    assert (expand["gate_up"]["block_r"], expand["gate_up"]["block_n"], expand["gate_up"]["prefetch"]) == (16, 128, False)
    shrink, expand = before(256, 1, 64)                           # 64-token tiles: the shrink's too
    assert shrink["qkv"]["block_t"] == 64 and not shrink["qkv"]["pdl"] and expand["qkv"] == {"pdl": False}
