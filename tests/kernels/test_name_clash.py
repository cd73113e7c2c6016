"""The top-level `kernels` package warns when Hugging Face's `kernels` distribution is installed beside it."""
import importlib.metadata

import pytest

import kernels


def test_no_warning_without_the_other_distribution(recwarn):
    assert not kernels.warn_on_name_clash()
    assert not [w for w in recwarn if "Hugging Face" in str(w.message)]


def test_warns_with_a_cause_and_a_way_out(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.19.1" if name == "kernels" else real(name))
    with pytest.warns(RuntimeWarning, match=r"`kernels` package \(version 0.19.1\).*pip uninstall kernels"):
        assert kernels.warn_on_name_clash()
