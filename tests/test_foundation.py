"""Foundation: generated protos are fresh, the CLI answers, init-model output loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_generated_protos_are_fresh(tmp_path):
    """Regenerate into a temp dir; any difference means `make protos` was not run."""
    import shutil
    (tmp_path / "protos").mkdir()
    for proto in (ROOT / "protos").glob("*.proto"):
        shutil.copy(proto, tmp_path / "protos" / proto.name)
    import grpc_tools
    from grpc_tools import protoc
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{tmp_path}", f"-I{include}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", *[str(p) for p in sorted((tmp_path / "protos").glob("*.proto"))]]
    assert protoc.main(args) == 0
    for generated in sorted((tmp_path / "protos").glob("*_pb2*.py*")):
        committed = ROOT / "protos" / generated.name
        assert committed.exists(), f"{generated.name} missing: run `make protos`"
        assert committed.read_text() == generated.read_text(), f"{generated.name} is stale: run `make protos`"


def test_protos_import_and_services():
    from protos import adapter_store_pb2, inference_worker_pb2, router_pb2  # noqa: F401
    names = {s.full_name for f in (adapter_store_pb2, inference_worker_pb2, router_pb2)
             for s in f.DESCRIPTOR.services_by_name.values()}
    assert names == {"openlora.v1.AdapterStore", "openlora.v1.InferenceWorker", "openlora.v1.Router"}


def test_cli_help_everywhere():
    from services.cli import _SUBCOMMANDS
    for sub in ["", *_SUBCOMMANDS]:
        out = subprocess.run([sys.executable, "-m", "services.cli", *([sub] if sub else []), "--help"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout


def test_init_model_loads_and_generates(tmp_path):
    import transformers
    out = subprocess.run([sys.executable, "-m", "services.cli", "init-model", str(tmp_path / "m"), "--family", "qwen2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    text = "naïve café 東京 🙂"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0], skip_special_tokens=True) == text   # byte-level BPE: any UTF-8 round-trips
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5


def test_init_model_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from services.tiny_model import init_model
    a = load_file(init_model(tmp_path / "a") / "model.safetensors")
    b = load_file(init_model(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
