"""`plait data prepare INPUT... --tokenizer T --out DIR`: text in, packed token shards out.

    plait data prepare corpus/ --tokenizer train:4096 --out data/corpus-bpe
    plait train data.path=data/corpus-bpe

The run: list the inputs and cut them into tasks (plait.data.sources); load or train the
tokenizer; worker processes encode the tasks into part files (plait.data.encode) while this
process merges finished parts, in task order, into shards of about --shard-mb and shows progress;
then meta.json. Everything is written into a hidden sibling folder `.DIR.tmp-HOST-PID` that is
renamed to DIR at the very end, so an interrupted run leaves no DIR that looks prepared (and the
next run removes the leftover folder of a dead run). The format is described in docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import shutil
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path

from plait.data import encode, sft
from plait.data.merge import ShardWriter
from plait.data.progress import Progress
from plait.data.shards import DTYPES, FORMAT, MASKED_VERSION, META, VERSION
from plait.data.sources import FORMATS, discover, plan_tasks, read_documents
from plait.data.tokenizer import ByteTokenizer, load_tokenizer, parse_train_spec, train_bpe
from plait.errors import ConfigError, PlaitError

MB = 1 << 20


class PrepareError(PlaitError, RuntimeError):
    """The preparation could not finish (a worker died); nothing was written to --out."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text files, .jsonl / .jsonl.gz / .parquet files, folders of them, "
                             "or python:stdlib (this Python's standard library sources)")
    parser.add_argument("--tokenizer", required=True, metavar="T",
                        help="byte (ids 0-255, end-of-text 256), train:VOCAB (byte-level BPE "
                             "trained on the inputs, saved in DIR), a local tokenizer.json, or a "
                             "local model folder holding one")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty output folder")
    parser.add_argument("--field", default="text", help="JSON field / parquet column of the text")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents held out for validation, chosen by a hash of each "
                             "document's text")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: one per core)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="read every input as this format (auto: by suffix; sft: .jsonl "
                             "fine-tuning records, prompt/response or chat messages, stored with "
                             "a loss mask)")
    parser.add_argument("--eos", default=None,
                        help="end-of-text token of a given tokenizer (default: its tokenizer_config"
                             ".json eos_token, else a known name such as <|endoftext|>)")
    parser.add_argument("--shard-mb", type=float, default=256.0,
                        help="target size of a token shard")
    parser.add_argument("--task-mb", type=float, default=0.0,
                        help="input per worker task (0: input / 128, between 1 and 64)")
    parser.add_argument("--train-mb", type=float, default=1024.0,
                        help="train:VOCAB learns from at most this much of the training documents")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")


def main(args: argparse.Namespace) -> int:
    """Entry point of `plait data prepare`: 0 on success, 2 on bad input, 1 when a worker died,
    130 on Ctrl-C."""
    try:
        prepare(args)
    except ConfigError as e:
        print(f"plait: error: {e}", file=sys.stderr, flush=True)
        return 2
    except PrepareError as e:
        print(f"plait: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # the workers are stopped and the temporary folder removed
        print(f"plait data prepare: interrupted; nothing was written to {args.out}",
              file=sys.stderr, flush=True)
        return 130
    return 0


def cores() -> int:
    """Cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        what = "it is already prepared (meta.json)" if (out / META).exists() else "it is not empty"
        raise ConfigError(f"--out {out}: {what}; name a new or empty folder, or delete {out} first")


def _remove_stale(out: Path) -> None:
    """Leftovers of interrupted runs of this host whose process is gone."""
    host = socket.gethostname()
    for d in out.parent.glob(f".{out.name}.tmp-{host}-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            pass


def _tokenizer(args, tasks, tmp: Path, show: bool) -> tuple[object, dict]:
    vocab = parse_train_spec(args.tokenizer)
    if args.tokenizer == "byte":
        tok = ByteTokenizer()
        return tok, {"name": "byte", "kind": "byte", "vocab_size": tok.prepared_vocab_size,
                     "eos_id": tok.eos_id, "file": None}
    if vocab is None:
        tok = load_tokenizer(args.tokenizer, args.eos)
        shutil.copyfile(tok.file, tmp / "tokenizer.json")  # the folder stays self-contained
        info = {"name": args.tokenizer, "kind": "tokenizers", "source": tok.source}
    else:
        cap = int(args.train_mb * MB)
        threshold = int(args.val_fraction * 2**64)
        seen = [0]
        # fine-tuning records: the BPE learns from their plain rendering (no template yet)
        parse = sft.parse_record(None) if args.format == "sft" else None

        def texts():  # the training split's documents only: validation stays unseen
            for task in tasks:
                for doc in read_documents(task, args.field, lambda n: None, parse):
                    data, text = encode.as_bytes_and_text(doc if parse is None
                                                          else sft.text_of(doc))
                    if encode.is_val(data, threshold):
                        continue
                    yield text if text is not None else data.decode("utf-8", "replace")
                    seen[0] += len(data)
                    if seen[0] >= cap:
                        return

        t0 = time.perf_counter()
        if show:
            print(f"plait data prepare: training a {vocab}-token byte-level BPE", flush=True)
        tok = train_bpe(texts(), vocab, tmp / "tokenizer.json")
        info = {"name": args.tokenizer, "kind": "tokenizers", "source": args.tokenizer,
                "train_bytes": seen[0], "train_seconds": round(time.perf_counter() - t0, 3)}
        if show:
            print(f"plait data prepare: tokenizer trained on {seen[0] / MB:.1f} MB in "
                  f"{info['train_seconds']:.1f} s ({tok.vocab_size} tokens)", flush=True)
    info.update(vocab_size=tok.vocab_size, eos_id=tok.eos_id, eos_token=tok.eos_token,
                file="tokenizer.json")
    return tok, info


def _stop_workers(ex: ProcessPoolExecutor, clean: bool) -> None:
    if clean:
        ex.shutdown(wait=True)
        return
    procs = list((getattr(ex, "_processes", None) or {}).values())  # shutdown forgets them
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:  # running tasks would go on writing into the folder being removed
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


def _encode_all(args, tasks, tmp: Path, tok_info: dict, workers: int, bar: Progress,
                template: dict | None = None) -> dict:
    # fork: workers start at once, without re-importing plait (and torch) as spawn would
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))  # input bytes read, tokens written
    spec = {"tokenizer": "byte" if tok_info["kind"] == "byte" else str(tmp / "tokenizer.json"),
            "eos": tok_info.get("eos_token"), "eos_id": tok_info["eos_id"],
            "dtype": DTYPES[tok_info["dtype"]].str, "val_fraction": args.val_fraction,
            "field": args.field, "tmp": str(tmp), "sft": args.format == "sft",
            "chat_template": template}
    target = max(1, int(args.shard_mb * MB))
    writers = {s: ShardWriter(tmp, s, target) for s in ("train", "val")}
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=encode.init_worker,
                             initargs=(spec, counters))
    # forked workers inherit this: one tokenizers thread each, and no warning about a fork after
    # the BPE training's threads ran in this process
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pending = {ex.submit(encode.run_task, t): t.index for t in tasks}
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    done: dict[int, dict] = {}
    nxt = 0
    clean = False
    try:
        while pending:
            finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for f in finished:
                pending.pop(f)
                stats = f.result()  # a worker's ConfigError is raised here
                done[stats["index"]] = stats
            while nxt in done:  # merge in task order: shards follow the input order
                stats = done.pop(nxt)
                writers["train"].add(stats["train"])
                writers["val"].add(stats["val"])
                nxt += 1
            bar.update(counters[0].value, counters[1].value)
        clean = True
    except BrokenProcessPool as e:
        raise PrepareError(f"a worker process of `plait data prepare` died (killed, or out of "
                           f"memory: fewer --workers need less); nothing was written to "
                           f"{args.out}: run it again") from e
    finally:
        _stop_workers(ex, clean)
    for w in writers.values():
        w.close()
    return {s: w.summary() for s, w in writers.items()}


def prepare(args: argparse.Namespace) -> dict:
    """Runs `plait data prepare` with parsed arguments; returns meta.json's contents."""
    t0 = time.perf_counter()
    out = Path(args.out)
    _check_out(out)
    if not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {args.val_fraction}: give a share in [0, 1), e.g. 0.01")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give a count, or 0 for one per core")
    parse_train_spec(args.tokenizer)  # a bad train:VOCAB fails before any reading
    files = discover(args.inputs, args.format)
    total = sum(f.stat().st_size for f, _ in files)
    task_bytes = int(args.task_mb * MB) if args.task_mb > 0 else min(64 * MB, max(MB, total // 128))
    tasks = plan_tasks(files, task_bytes)
    show = not args.no_progress
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir()
    try:
        tok, tok_info = _tokenizer(args, tasks, tmp, show)
        # fine-tuning records: rendered with the tokenizer folder's chat template, if it has one
        template = sft.chat_template(args.tokenizer) if args.format == "sft" else None
        vocab = tok_info["vocab_size"]
        tok_info["dtype"] = "uint16" if vocab <= 2**16 else "uint32"
        workers = min(args.workers or cores(), len(tasks))
        with Progress(total, enabled=show) as bar:
            splits = _encode_all(args, tasks, tmp, tok_info, workers, bar, template)
        if splits["train"]["tokens"] == 0:
            raise ConfigError(f"the inputs ({', '.join(args.inputs)}) hold no text for the "
                              f"training split: check --field {args.field!r} and --val-fraction")
        meta = {
            "format": FORMAT,
            "version": MASKED_VERSION if args.format == "sft" else VERSION,
            "vocab_size": vocab,
            "eos_id": tok_info["eos_id"],
            "dtype": tok_info.pop("dtype"),
            "layout": "each document's token ids, then eos_id; a split's shards concatenate in "
                      "order",
            "input_format": args.format,
            **({"sft": {
                "rendering": "the chat template of tokenizer_config.json" if template else
                "plain: '<role>: ' + content + newline per message; prompt + response verbatim",
                "loss_mask": "per shard, uint8 per token: 1 where the token is a trained target "
                             "(response / assistant messages; a record's eos_id when its last "
                             "token is)"}} if args.format == "sft" else {}),
            "tokenizer": tok_info,
            "val_fraction": args.val_fraction,
            "val_rule": "a document is held out when blake2b(its UTF-8 text, 8 bytes) as a "
                        "little-endian number / 2**64 < val_fraction",
            "splits": splits,
            "inputs": {"files": len(files), "bytes": total, "tasks": len(tasks),
                       "workers": workers},
            "command": shlex.join(["plait", "data", "prepare", *_argv(args)]),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, out)  # the commit point: an empty DIR is replaced whole
        except OSError as e:
            raise ConfigError(f"--out {out} was filled by someone else during the run ({e}): "
                              f"name a new or empty folder") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.val_fraction > 0 and splits["val"]["documents"] == 0:
        print(f"plait data prepare: warning: none of the {splits['train']['documents']} documents "
              f"fell into the validation split (--val-fraction {args.val_fraction}): training on "
              f"{out} runs without validation; use more documents or a larger share", flush=True)
    if show:
        print(f"plait data prepare: {out}: {splits['train']['tokens']:,} train tokens in "
              f"{len(splits['train']['shards'])} shard(s), {splits['val']['tokens']:,} validation "
              f"tokens ({splits['val']['documents']} documents), {meta['seconds']:.1f} s",
              flush=True)
    return meta


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line that gives these arguments (defaults left out)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    d = vars(defaults.parse_args(["x", "--tokenizer", "t", "--out", "o"]))
    out = [*args.inputs]
    for k, v in vars(args).items():
        if k in d and k != "inputs" and v != d[k] or k in ("tokenizer", "out"):
            flag = "--" + k.replace("_", "-")
            out += [flag] if v is True else [flag, str(v)]
    return out


if __name__ == "__main__":  # `python -m plait.data.prepare ...`, the same as `plait data prepare`
    _ap = argparse.ArgumentParser(prog="plait data prepare", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_ap)
    sys.exit(main(_ap.parse_args()))
