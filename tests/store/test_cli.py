"""`openlora store` and `openlora adapters push|list|show|pull|rm` as real subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.store.harness import ROOT, StoreProcess
from tests.store.synthetic import lora_tensors, sha256_file, write_adapter


def cli(store: StoreProcess, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "services.cli", "adapters", "--store", store.address, *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert (out.returncode == 0) == ok, f"{args}: rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture
def store_proc(data_dir, db_url, tmp_path):
    proc = StoreProcess(data_dir, db_url, tmp_path / "store.log").start()
    yield proc
    proc.kill()


def test_cli_push_list_show_pull_rm(store_proc, tmp_path, tiny_model_dir, adapter_factory):
    src = adapter_factory(tiny_model_dir, rank=8, seed=5)
    out = cli(store_proc, "push", str(src), "--name", "acme/support-bot", "--base-model", "tiny-llama",
              "--description", "first", "--label", "team=support", "--label", "stage=dev")
    assert out.stdout.startswith("acme/support-bot@1 sha256=")
    listed = cli(store_proc, "list").stdout.splitlines()
    assert listed[0].split()[:3] == ["NAME", "VERSION", "BASE_MODEL"]
    assert listed[1].split()[:4] == ["acme/support-bot", "1", "tiny-llama", "8"]
    shown = json.loads(cli(store_proc, "show", "acme/support-bot@1").stdout)
    assert shown["labels"] == {"team": "support", "stage": "dev"} and shown["description"] == "first"
    assert shown["target_modules"] == ["q_proj", "v_proj"]

    cli(store_proc, "pull", "acme/support-bot", str(tmp_path / "pulled"))
    assert sha256_file(tmp_path / "pulled" / "adapter_model.safetensors") == shown["sha256"]
    config = json.loads((tmp_path / "pulled" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == "tiny-llama"
    original = load_file(src / "adapter_model.safetensors")
    pulled = load_file(tmp_path / "pulled" / "adapter_model.safetensors")
    assert original.keys() == pulled.keys() and all(torch.equal(original[k], pulled[k]) for k in original)

    json_lines = cli(store_proc, "list", "--json", "--prefix", "acme/").stdout.splitlines()
    assert [json.loads(line)["version"] for line in json_lines] == [1]
    assert cli(store_proc, "rm", "acme/support-bot").stdout.strip() == "deleted acme/support-bot@1"
    assert cli(store_proc, "list").stdout.splitlines()[1:] == []
    failed = cli(store_proc, "show", "acme/support-bot", ok=False)
    assert "NotFound" in failed.stderr and "acme/support-bot" in failed.stderr


def test_cli_push_shows_progress_and_refuses_bad_input(store_proc, tmp_path):
    sizes = {"q_proj": (2048, 2048), "v_proj": (2048, 2048)}
    big = write_adapter(tmp_path / "big", tensors=lora_tensors(rank=64, num_layers=5, sizes=sizes), rank=64)
    out = cli(store_proc, "push", str(big), "--name", "big", "--base-model", "m")
    assert "pushing big:" in out.stderr and "(100%)" in out.stderr
    bad = write_adapter(tmp_path / "bad", rank=8, tensors=lora_tensors(rank=4))
    failed = cli(store_proc, "push", str(bad), "--name", "bad", ok=False)
    assert "InvalidArgument" in failed.stderr and "does not match rank 8" in failed.stderr
    failed = cli(store_proc, "push", str(big), "--name", "no/t/ok", ok=False)
    assert "bad adapter name" in failed.stderr
