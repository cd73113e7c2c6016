"""`openlora init-model`: a tiny Llama-family model made locally, for tests and the demo.

Random weights from a fixed seed, saved as safetensors next to a config.json that
transformers loads, and real tokenizer files: a byte-level BPE (any UTF-8 text
round-trips) trained on a small embedded corpus. Deterministic; seconds on a CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

_CORPUS = """
OpenLoRA serves thousands of fine-tuned adapters of one base model from a few GPUs.
The quick brown fox jumps over the lazy dog. Once upon a time there was a model.
A legal contract binds the parties; finance reports revenue, margin and cash flow.
def add(a, b):\n    return a + b\n
Les données sont arrivées. Die Straße ist schön. 東京は日本の首都です。 Привет, мир! 🙂
1234567890 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " @ # $ % ^ & _ ~
"""


@dataclass
class TinyModelConfig:
    family: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    rope_scaling_llama3: bool = False   # Llama 3.1-style rope scaling
    tie_word_embeddings: bool = False
    initializer_range: float = 0.08     # peakier logits than the default 0.02: fewer greedy ties
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be >= 300 (256 bytes + specials + merges)")


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    from tokenizers import processors
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False)


def _model_config(cfg: TinyModelConfig, bos_id: int, eos_id: int):
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5, initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    if cfg.family == "llama":
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        if cfg.rope_scaling_llama3:
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    if cfg.family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                    use_sliding_window=False)


def init_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write the model directory (config.json, model.safetensors, tokenizer files)."""
    import torch
    import transformers

    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(cfg.vocab_size)
    config = _model_config(cfg, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(cfg.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "openlora_tiny.json").write_text(json.dumps(cfg.__dict__, indent=2))
    return out
