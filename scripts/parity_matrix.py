"""Run the whole parity matrix (dp, tp, pp in {1, 2}, ZeRO 0-3; up to 8 ranks) and write
docs/parity_matrix.md.

    .venv/bin/python scripts/parity_matrix.py                 # every layout, ZeRO 0-3
    .venv/bin/python scripts/parity_matrix.py --zero 0 --out /tmp/m.md
    python scripts/parity_matrix.py --device cuda --dtype bf16 --out $OUT/m.md   # on a GPU machine

The same runs as tests/test_hybrid.py (which samples the 8-rank layouts in CI): the tiny model,
5 steps (fp32, or bf16 autocast with --dtype bf16), global batch 8 in micro-batches of 2
(gradient accumulation), gradient clipping active
on every step, against the single-process run; each layout must agree within 1e-5 relative (fp32;
bf16: tests/common.py's TOLERANCES) in every step's loss and gradient norm and every final
parameter. Exits 1 if any layout does not. --device cuda runs every rank's tensors on the one GPU
(gloo ranks sharing it: NCCL refuses two ranks per device).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from common import TOLERANCES, tiny_cfg  # noqa: E402

from plait import parity  # noqa: E402

CLIP = 0.05  # as tests/test_hybrid.py: below every step's gradient norm


def corpus(folder: Path) -> str:
    """The test suite's corpus (tests/conftest.py): 250 KB of standard-library source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "difflib.py", "textwrap.py", "fractions.py", "statistics.py"]
    p = folder / "corpus.txt"
    p.write_bytes(b"".join((root / n).read_bytes() for n in names)[:250_000])
    return str(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zero", default="0,1,2,3",
                    help="ZeRO stages, comma-separated (default 0,1,2,3)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "parity_matrix.md"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per world size's spawn")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where every rank's tensors live")
    ap.add_argument("--dtype", default="fp32", choices=sorted(TOLERANCES),
                    help="training dtype of both sides")
    args = ap.parse_args(argv)
    tol = TOLERANCES[args.dtype]
    zeros = tuple(int(z) for z in args.zero.split(","))
    layouts = parity.matrix(zeros=zeros)
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_cfg(corpus(Path(tmp)), model={"n_layers": 2}, optim={"grad_clip": CLIP},
                         train={"dtype": args.dtype})
        t0 = time.perf_counter()
        ref = parity.reference(base, args.device)
        rows, ok = [], True
        for world in sorted({lay.world for lay in layouts}):
            mine = [lay for lay in layouts if lay.world == world]
            t = time.perf_counter()
            got = parity.run_layouts(base, mine, timeout=args.timeout, device=args.device)
            print(f"world {world}: {len(mine)} layouts in {time.perf_counter() - t:.0f} s",
                  flush=True)
            for lay in mine:
                res = got[lay.name]
                if isinstance(res, str):
                    ok = False
                    rows.append((lay, None, res.strip().splitlines()[-1][:120]))
                    continue
                errs = [parity.errors(ref, r) for r in res]
                worst = {k: max(e[k] for e in errs) for k in ("loss", "norm", "param")}
                passed = all(v <= tol[k] for k, v in worst.items())
                ok &= passed
                rows.append((lay, worst, "pass" if passed else "FAIL"))
        wall = time.perf_counter() - t0
    clipped = all(n > CLIP for n in ref["norms"])
    ok &= clipped
    if args.device == "cuda":
        machine = (f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores (gloo, CUDA "
                   "tensors, every rank on the one GPU)")
    else:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
                   "(gloo, CPU tensors)")
    lines = [
        "# Parity matrix",
        "",
        "Every dp × tp × pp × ZeRO layout against the single-process run (docs/architecture.md, "
        "'Contracts'): the tiny GPT "
        f"(2 blocks, d_model 32), 5 AdamW steps ({args.dtype}), global batch 8 sequences of 32 "
        "tokens in micro-batches of 2 "
        "(gradient accumulation: 4 micro-batches per step at dp = 1, 2 at dp = 2), "
        f"optim.grad_clip = {CLIP} (active on every step: reference gradient norms "
        f"{', '.join(f'{n:.3f}' for n in ref['norms'])}). Errors are the largest relative error "
        "over steps and ranks: loss |Δ|/|ref|, gradient norm (before clipping, the clip factor's "
        "input), and ‖Δ‖/‖ref‖ per parameter tensor after the last step. Tolerance "
        f"{', '.join(f'{k} {v:g}' for k, v in tol.items())}. ZeRO > 0 appears with dp = 2 only (at "
        "dp = 1 it is the plain path).",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {machine}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `python scripts/parity_matrix.py --zero {args.zero} --device {args.device} "
        f"--dtype {args.dtype}` ({wall:.0f} s)",
        f"- result: {'all layouts pass' if ok else 'FAILURES'}",
        "",
        "| layout | ranks | loss | grad norm | parameters | result |",
        "|---|---|---|---|---|---|",
    ]
    for lay, worst, verdict in rows:
        if worst is None:
            lines.append(f"| {lay.name} | {lay.world} | - | - | - | failed: {verdict} |")
        else:
            lines.append(f"| {lay.name} | {lay.world} | {worst['loss']:.1e} | {worst['norm']:.1e} "
                         f"| {worst['param']:.1e} | {verdict} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
