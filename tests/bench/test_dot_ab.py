"""bench/dot_ab.py's "before": the session-13 block rules of decode dot tiles, as they were."""
import importlib


def test_before_is_the_session_13_rule():
    # imported in the test, not at collection: bench.dot_ab imports the Triton launchers, which must be
    # imported after the kernels' conftest picks the interpreter
    before = importlib.import_module("bench.dot_ab").before
    shrink, expand = before(256, 64)
    assert (expand["gate_up"]["block_n"], expand["gate_up"]["nb_per_prog"]) == (128, 2)     # 16 x 224 blocks
    assert (expand["qkv"]["block_n"], expand["qkv"]["nb_per_prog"]) == (256, 1)             # 16 x 24
    assert not any(cfg["prefetch"] for cfg in expand.values())
    assert shrink["qkv"]["split_k"] == 16 and shrink["qkv"]["num_stages"] == 3 and "down" not in shrink
    assert before(64, 8)[0]["o"] == {"block_t": 2, "halve": False}                 # 2-token shrinks: 4 rows
    assert "down" not in before(64, 8)[0] and before(64, 8)[1]["o"]["nb_per_prog"] == 1
    assert before(64, 64) == ({}, {})                                             # 1-token tiles: unchanged
