"""`openlora init-model DIR [--family llama|mistral|qwen2]`."""
from __future__ import annotations

import argparse

from services.tiny_model import FAMILIES, TinyModelConfig, init_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory")
    p.add_argument("--family", choices=FAMILIES, default="llama")
    p.add_argument("--layers", type=int, default=TinyModelConfig.num_hidden_layers)
    p.add_argument("--hidden", type=int, default=TinyModelConfig.hidden_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-scaling-llama3", action="store_true", help="Llama 3.1-style rope scaling")


def run(args: argparse.Namespace) -> int:
    cfg = TinyModelConfig(family=args.family, num_hidden_layers=args.layers, hidden_size=args.hidden,
                          intermediate_size=2 * args.hidden, seed=args.seed,
                          rope_scaling_llama3=args.rope_scaling_llama3)
    out = init_model(args.dir, cfg)
    print(f"wrote {args.family} model to {out}")
    return 0
