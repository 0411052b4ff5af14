"""Write a tiny random-init transformers model directory (config.json only) for `model.hf`.

    .venv/bin/python scripts/make_tiny_hf.py /tmp/tiny-llama --family llama
    .venv/bin/python scripts/make_tiny_hf.py /tmp/tiny-gpt2 --family gpt2 --layers 4
    plait train model.hf=/tmp/tiny-llama parallel.tp=2 --nproc 2

Hidden size 64, 4 heads (Llama: 2 key/value heads), no dropout; the vocabulary defaults to 256
(plait's byte-level default corpus). Nothing is downloaded; without model.safetensors plait
initializes the model from train.seed.
"""

from __future__ import annotations

import argparse

from plait.models.hf import tiny_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write config.json into")
    ap.add_argument("--family", choices=("llama", "gpt2", "gemma", "phi3"), default="llama")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--untied", action="store_true",
                    help="GPT-2: separate embedding and head (needed for parallel.pp > 1)")
    args = ap.parse_args()
    over = ({"n_layer": args.layers, "tie_word_embeddings": not args.untied}
            if args.family == "gpt2" else {"num_hidden_layers": args.layers})
    tiny_config(args.family, vocab_size=args.vocab, **over).save_pretrained(args.out)
    print(f"wrote {args.out}/config.json ({args.family}, {args.layers} layers)")


if __name__ == "__main__":
    main()
