"""Write a tiny transformers model directory (config.json; with --weights, random weights too)
for `model.hf`.

    .venv/bin/python scripts/make_tiny_hf.py /tmp/tiny-llama --family llama
    .venv/bin/python scripts/make_tiny_hf.py /tmp/tiny-gpt2 --family gpt2 --layers 4
    .venv/bin/python scripts/make_tiny_hf.py /tmp/tiny-phi3 --family phi3 --weights
    plait train model.hf=/tmp/tiny-llama parallel.tp=2 --nproc 2

Hidden size 64, 4 heads (Llama: 2 key/value heads), no dropout; the vocabulary defaults to 256
(plait's byte-level default corpus). Nothing is downloaded; without model.safetensors plait
initializes the model from train.seed. `--weights` writes a random initialization (seed 0) the
way a real model directory holds its weights: transformers' save_pretrained (model.safetensors).
"""

from __future__ import annotations

import argparse

import torch

from plait.models.hf import build_causal_lm, tiny_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write config.json into")
    ap.add_argument("--family", choices=("llama", "gpt2", "gemma", "phi3"), default="llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--untied", action="store_true",
                    help="GPT-2: separate embedding and head (needed for parallel.pp > 1)")
    ap.add_argument("--weights", action="store_true",
                    help="also write random weights (seed 0) as model.safetensors")
    args = ap.parse_args()
    over = ({"n_layer": args.layers, "tie_word_embeddings": not args.untied}
            if args.family == "gpt2" else {"num_hidden_layers": args.layers})
    config = tiny_config(args.family, vocab_size=args.vocab, **over)
    if args.weights:
        torch.manual_seed(0)
        build_causal_lm(config).save_pretrained(args.out)  # config.json + model.safetensors
    else:
        config.save_pretrained(args.out)
    what = "config.json and model.safetensors" if args.weights else "config.json"
    print(f"wrote {what} into {args.out} ({args.family}, {args.layers} layers)")


if __name__ == "__main__":
    main()
