"""Real PEFT LoRA adapters made on the spot, for the demo and the tests (needs `peft`)."""
from __future__ import annotations

import json
from pathlib import Path


def make_adapter(model_dir: Path, out_dir: Path, *, rank: int = 8, alpha: float = 16.0,
                 target_modules=("q_proj", "v_proj"), seed: int = 0, use_rslora: bool = False,
                 std: float = 0.1, base_model: str | None = None) -> Path:
    """A real PEFT LoRA adapter (save_pretrained) with random A *and* B.

    PEFT initialises B to zero (the adapter would be a no-op); tests need adapters
    that change the output, so both factors are drawn from N(0, std²) with `seed`.
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        use_rslora=use_rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    if base_model is not None:
        cfg_path = out_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir
