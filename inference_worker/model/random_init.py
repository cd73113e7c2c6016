"""A Llama-family model with random weights drawn on the device: no files, no host copy.

For benchmarks of a model shape (Llama-3-8B is 16 GB of bf16: writing and reading it
as safetensors would cost minutes and disk). Projections and embeddings ~ N(0, std),
norms 1, as transformers initializes; a fixed seed.
"""
from __future__ import annotations

import torch

from inference_worker.model.llama import LlamaForCausalLM, LlamaSpec, RMSNorm
from kernels.backend import KernelOps


@torch.no_grad()
def random_model(spec: LlamaSpec, ops: KernelOps, device: torch.device, dtype: torch.dtype, max_len: int,
                 seed: int = 0, std: float = 0.02) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(spec, ops)
    model = model.to_empty(device=device).to(dtype)
    if spec.tie_word_embeddings:          # to_empty makes new tensors: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    generator = torch.Generator(device=device).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, param in model.named_parameters():
        if id(param) in norms:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
    model.init_rope(max_len)
    return model.eval()
