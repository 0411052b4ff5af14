"""`plait export CKPT --format hf OUT`: a checkpoint of a model.hf run, saved under any layout, as
a transformers directory that `AutoModelForCausalLM.from_pretrained(OUT)` loads.

    plait export runs/x --format hf out/ [--max-shard-size 5GB] [--source DIR]

OUT gets what `save_pretrained` writes: the weights as safetensors under the transformers model's
own keys (plait's `lm.` prefix stripped; a head tied to the embedding omitted, as transformers
omits it), in one `model.safetensors` or, past --max-shard-size, in shards
`model-0000k-of-0000n.safetensors` named by `model.safetensors.index.json`; `config.json` from the
run's model.hf directory (recorded in the checkpoint's manifest; --source names another), its
`dtype` set to the weights' (plait trains fp32 master weights, so `from_pretrained` loads what was
trained), and the generation config and tokenizer files that directory has. The checkpoint is read
in one process (plait.checkpoint.export.read_checkpoint_model: full tensors from any layout).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from plait.checkpoint import store
from plait.checkpoint.export import read_checkpoint_model
from plait.checkpoint.store import CheckpointError
from plait.models.hf import build_causal_lm, read_config
from plait.models.hf_weights import INDEX, ROOT, WEIGHTS, aliases

# copied from the model.hf directory when there (besides config.json)
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
               "chat_template.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from "5GB" (10^9, as transformers reads it), "500MiB" (2^20) or a plain count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise CheckpointError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB, "
                              "2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def hf_state(tensors: dict[str, torch.Tensor], config, where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the transformers model's keys, in its state-dict order, each
    weight once (a tied head left out); CheckpointError when they do not fit `config`'s model."""
    with torch.device("meta"):
        lm = build_causal_lm(config)
    shapes = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    later = {n for _, names in aliases(lm) for n in names[1:]}  # a tied weight's other names
    out, missing, wrong = {}, [], []
    for key, shape in shapes.items():
        if key in later:
            continue
        t = tensors.get(ROOT + key)
        if t is None:
            missing.append(key)
        elif tuple(t.shape) != shape:
            wrong.append(f"{key} is {list(t.shape)} there, {list(shape)} in config.json's model")
        else:
            out[key] = t.contiguous()
    extra = [k for k in tensors if k.removeprefix(ROOT) not in shapes]
    if missing or wrong or extra:
        raise CheckpointError(f"checkpoint {where} does not fit the model of its config.json: "
                              f"missing {missing[:3]}, not in the model {extra[:3]}"
                              + (f", shapes: {'; '.join(wrong[:3])}" if wrong else ""))
    return out


def shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive tensors, a new shard whenever the next would pass `max_bytes` (a tensor larger
    than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def export_hf(checkpoint: str | Path, out: str | Path, max_shard_size: str | int = "5GB",
              source: str | Path | None = None) -> list[Path]:
    """Write the model of `checkpoint` (a checkpoint, checkpoints or run folder) into folder `out`
    as a transformers directory; returns the files written."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    path = store.find(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{str(out)!r} exists already: choose another output folder "
                              "(nothing is overwritten)")
    tensors, manifest = read_checkpoint_model(path)
    src = source or manifest.get("config", {}).get("model", {}).get("hf")
    if not src:
        raise CheckpointError(f"checkpoint {str(path)!r} is not of a model.hf run (it trained "
                              "plait's GPT): export it with --format safetensors")
    config = read_config(src)
    state = hf_state(tensors, config, repr(str(path)))
    shards = shard(state, limit)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    names = ([WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, part in zip(names, shards):
        save_file(part, str(out / name), metadata={"format": "pt"})
        written.append(out / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in state.values())},
                 "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / INDEX)
    cfg = json.loads((Path(src) / "config.json").read_text())
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    written.append(out / "config.json")
    for name in EXTRA_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, out / name)
            written.append(out / name)
    return written
