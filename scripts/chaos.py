"""A chaos run: 4-rank data-parallel `plait train` under injected faults, against the same run
uninterrupted.

    .venv/bin/python scripts/chaos.py --seed 39829         # the recorded run (docs/chaos.md)
    .venv/bin/python scripts/chaos.py --seed 7 --steps 200 --work /tmp/c7 --out /tmp/c7/out

One `plait train --nproc 4 --max-restarts N --run-dir WORK/chaos` (tiny GPT, seq 64, global batch
16, micro-batch 2, a ~0.6 MB text file cut from this interpreter's standard library, a checkpoint
every 10 steps, 3 kept) runs while this script, from a seeded plan, injects:

- `kill`: SIGKILL of a random worker rank at a random moment (workers are the children of the
  torchrun agent, their rank read from /proc/PID/environ); one of them lands a few steps after the
  NaN step, so that a restart resumes from the checkpoint saved right after a skipped step;
- `kill_in_save`: SIGKILL of a random rank while a save is in flight: its `.tmp-step-NNNNNNNN`
  folder under RUN/checkpoints (plait/checkpoint/store.py) holds data files and no manifest;
- `corrupt`: flipped bytes in `__0_0.distcp` of a checkpoint just committed (the newest), then a
  SIGKILL, so that the restart must fall back to the previous checkpoint and keep the damaged one
  as `<name>.damaged`;
- a NaN loss through the config's debug fault (`train.fault=nan` at a seeded rank and step, a
  multiple of checkpoint.every, so the save due on that skipped step is made on the next one).

After each kill it checks that the elastic agent replaced all four workers, which checkpoint the
restart resumed from, and how long it took; no progress for --hang-s seconds is recorded as a
hang and ends the run. Then it runs the same command with the same NaN fault and no kills in its
own run folder, and compares the final train / val losses of both summary.json files, every
step's loss, gradient norm, lr, val loss and skip flag of both metrics.jsonl files (each step must
appear exactly once), and the final checkpoints key by key (model, optimizer and trainer state
must be equal; the per-rank RNG states are reported); it also counts the loss points of both
runs' TensorBoard files (reported, not checked).

Writes OUT/events.json (seed, plan, every event with wall time and step, restarts, checks),
OUT/summary_chaos.json, OUT/summary_reference.json, OUT/chaos_console.log (the `plait:` lines
and the agent's lines, with the seconds since the start at which the script read them; the ranks'
tracebacks are left out, the full log stays in WORK) and OUT/reference_console.log. Exit status 0
when every check passes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NPROC = 4
EVERY = 10  # checkpoint.every
TMP_RE = re.compile(r"^\.tmp-step-(\d{8,})$")  # a save in flight (not prune's .tmp-step-deleted-*)
DONE_RE = re.compile(r"^step-(\d{8,})$")
RESUME_RE = re.compile(r"plait: resuming from (\S+) \(step (\d+)")
# fields of a metrics.jsonl record that must repeat bit for bit (the others are wall-clock timings)
COMPARED = ("loss", "grad_norm", "lr", "val_loss", "samples", "skipped", "skipped_steps",
            "critical_batch")
# a fixed, small corpus: the default (the whole standard library) would cost minutes to encode
CORPUS_FILES = ("argparse.py", "json/decoder.py", "json/encoder.py", "pathlib.py", "textwrap.py",
                "shutil.py", "subprocess.py", "typing.py", "dataclasses.py", "enum.py")


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="milliseconds")


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_corpus(work: Path) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = work / "corpus.txt"
    out.write_bytes(b"".join((root / n).read_bytes() + b"\n" for n in CORPUS_FILES))
    return out


def train_cmd(run_dir: Path, corpus: Path, a, nan_rank: int, nan_step: int) -> list[str]:
    return [sys.executable, "-m", "plait", "train", "--nproc", str(NPROC),
            "--max-restarts", str(a.max_restarts), "--run-dir", str(run_dir),
            "model.preset=tiny", "train.seq_len=64", "train.global_batch=16", "train.micro_batch=2",
            f"data.path={corpus}", f"checkpoint.every={EVERY}", "checkpoint.keep=3",
            f"train.steps={a.steps}", "log.progress=false", "log.plots=false",
            f"train.timeout_s={a.timeout_s}",  # a hung collective names itself before --hang-s
            # quoted: a bare nan is TOML's float NaN, which train.fault (a string) refuses
            'train.fault="nan"', f"train.fault_rank={nan_rank}", f"train.fault_step={nan_step}"]


def make_plan(rng: random.Random, a) -> dict:
    """Every random choice, drawn up front: one seed, one plan, whatever the timing."""
    nan_step = EVERY * rng.randint(3, a.steps // EVERY - 4)
    nan_rank = rng.randrange(NPROC)
    after_nan = nan_step + rng.randint(2, EVERY - 2)  # resumes from the checkpoint of nan_step + 1
    kinds = ["kill"] * a.kills + ["kill_in_save", "corrupt"]
    rng.shuffle(kinds)
    lo, hi, gap = 15, a.steps - 25, a.min_gap
    while True:  # spaced targets, none too close to the forced one
        picks = sorted(rng.sample(range(lo, hi - (len(kinds) - 1) * gap), len(kinds)))
        targets = [p + i * gap for i, p in enumerate(picks)]
        if all(abs(t - after_nan) >= gap for t in targets):
            break
    events = [{"kind": k, "target_step": t} for k, t in zip(kinds, targets)]
    events.append({"kind": "kill", "target_step": after_nan, "why": "resume after the NaN step"})
    events.sort(key=lambda e: e["target_step"])
    for e in events:
        e["rank"] = rng.randrange(NPROC)
        e["delay_s"] = round(rng.uniform(0.0, 0.15), 3)  # a random moment inside the step
        if e["kind"] == "corrupt":
            e["offset_fraction"] = round(rng.uniform(0.1, 0.9), 4)
    return {"nan_step": nan_step, "nan_rank": nan_rank, "events": events}


class Run:
    """One `plait train` launcher (the torchrun agent) and what can be seen of it from outside."""

    def __init__(self, cmd: list[str], run_dir: Path, log: Path):
        self.run_dir, self.log_path = run_dir, log
        self.ckpt = run_dir / "checkpoints"
        self.fh = open(log, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # a session of its own: on a hang the whole tree can be ended by its group id
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.fh, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.t0 = time.monotonic()
        self._off = 0
        self._part = b""
        self.lines: list[tuple[float, str]] = []  # (seconds since start, line) of the kept lines

    def workers(self) -> dict[int, int]:
        """rank -> pid of the agent's live worker processes."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        out = {}
        for pid in pids:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue  # exited between the two reads
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = pid
        return out

    def last_step(self) -> int:
        """The last step rank 0 logged to metrics.jsonl (0: none yet)."""
        f = self.run_dir / "metrics.jsonl"
        try:
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - 4096))
                tail = fh.read().splitlines()
        except OSError:
            return 0
        for line in reversed(tail):
            m = re.match(rb'\{"step": (\d+)', line)
            if m:
                return int(m.group(1))
        return 0

    def poll_log(self) -> None:
        """Keep the launcher's and the agent's lines (not the ranks' `[rankN]:` tracebacks)."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._off)
            data = fh.read()
        self._off += len(data)
        data = self._part + data
        *full, self._part = data.split(b"\n")
        t = time.monotonic() - self.t0
        for raw in full:
            line = raw.decode(errors="replace")
            if line.startswith("plait:") or re.match(r"^[IWE]\d{4} ", line):
                self.lines.append((t, line))

    def grep(self, pattern: str) -> list[str]:
        self.poll_log()
        return [ln for _, ln in self.lines if re.search(pattern, ln)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def newest(self) -> int:
        """Step of the newest committed checkpoint (-1: none)."""
        best = -1
        try:
            for d in os.scandir(self.ckpt):
                m = DONE_RE.match(d.name)
                if m and os.path.exists(os.path.join(d.path, "manifest.json")):
                    best = max(best, int(m.group(1)))
        except OSError:
            pass
        return best

    def end(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.fh.close()


class Hang(Exception):
    pass


def wait_for(run: Run, what: str, cond, limit: float, every: float = 0.02):
    """Poll `cond()` until truthy; Hang when `limit` seconds pass or the launcher exits first."""
    t = time.monotonic()
    while True:
        run.poll_log()  # so that each kept line's time is when it was written, within `every`
        v = cond()
        if v:
            return v
        if not run.alive():
            raise Hang(f"the launcher exited (code {run.proc.returncode}) while waiting for {what}")
        if time.monotonic() - t > limit:
            raise Hang(f"no {what} within {limit:.0f} s")
        time.sleep(every)


def all_workers(run: Run) -> dict[int, int]:
    return wait_for(run, "4 live workers",
                    lambda: (w := run.workers()) and len(w) == NPROC and w, 60)


def kill_rank(run: Run, ev: dict, before: dict[int, int] | None = None) -> dict[int, int]:
    """SIGKILL rank ev['rank'] of `before` (default: the workers now); records the moment and
    returns the worker set it was taken from."""
    before = before or all_workers(run)
    pid = before[ev["rank"]]
    ev["last_logged_step"] = run.last_step()
    os.kill(pid, signal.SIGKILL)
    ev["wall"], ev["t_s"], ev["pid"] = now_iso(), round(time.monotonic() - T0, 3), pid
    return before


def inject(run: Run, ev: dict, a) -> dict[int, int]:
    wait_for(run, f"step {ev['target_step']}", lambda: run.last_step() >= ev["target_step"],
             a.hang_s)
    if ev["kind"] == "kill":
        time.sleep(ev["delay_s"])
        before = kill_rank(run, ev)
        # rank 0 logs step s before the save after s, and validates step s + 1 before logging it
        s = ev["last_logged_step"]
        ev["hit"] = f"step {s + 1}" + (f" or the save of step {s}" if s % EVERY == 0 else "")
        return before
    if ev["kind"] == "kill_in_save":
        return kill_in_save(run, ev, a)
    return corrupt_then_kill(run, ev, a)


def kill_in_save(run: Run, ev: dict, a) -> dict[int, int]:
    """Poll for a save in flight (its temporary folder) and kill a rank once data files are on
    disk and no manifest is (a half-written checkpoint); a save that commits before the poll sees
    that is a miss, and the next one is tried."""
    ev["missed_saves"] = []
    seen_done = run.newest()
    deadline = time.monotonic() + a.hang_s
    workers, fresh = all_workers(run), time.monotonic()
    while time.monotonic() < deadline and run.alive():
        if time.monotonic() - fresh > 0.5:  # read /proc outside the save window, not inside it
            workers, fresh = all_workers(run), time.monotonic()
        try:
            flight = [d.path for d in os.scandir(run.ckpt) if TMP_RE.match(d.name)]
            files = os.listdir(flight[0]) if flight else []
        except OSError:  # renamed or removed under us: committed, look again
            flight, files = [], []
        if any(f.endswith(".distcp") for f in files) and "manifest.json" not in files:
            tmp = Path(flight[0])
            before = kill_rank(run, ev, workers)
            ev["save_dir"], ev["save_files_at_kill"] = tmp.name, sorted(files)
            ev["hit"] = f"the save of step {int(tmp.name[-8:])}"
            # whether rank 0 still committed it: right only if every rank had finished writing
            time.sleep(0.5)
            ev["committed_anyway"] = (run.ckpt / f"step-{tmp.name[-8:]}" / "manifest.json").exists()
            return before
        done = run.newest()
        if done > seen_done:
            ev["missed_saves"].append(done)  # committed between two polls
            seen_done = done
        time.sleep(0.001)
    raise Hang("no save in flight was caught")


def corrupt_then_kill(run: Run, ev: dict, a) -> dict[int, int]:
    """Wait for a checkpoint to be committed, flip bytes of its rank-0 data file while it is the
    newest, then kill a rank at once so the restart must verify it."""
    start = run.newest()
    workers = all_workers(run)
    step = wait_for(run, "a new checkpoint", lambda: (n := run.newest()) > start and n,
                    a.hang_s, 0.002)
    target = run.ckpt / f"step-{step:08d}" / "__0_0.distcp"
    size = target.stat().st_size
    off = int(size * ev["offset_fraction"])
    with open(target, "r+b") as fh:
        fh.seek(off)
        data = fh.read(16)
        fh.seek(off)
        fh.write(bytes(b ^ 0xFF for b in data))
    ev["corrupted"] = {"file": str(target.relative_to(run.run_dir)), "offset": off,
                       "bytes": len(data), "size": size, "wall": now_iso()}
    before = kill_rank(run, ev, workers)
    ev["newest_at_kill"] = run.newest()  # must still be `step`: else the restart never reads it
    ev["hit"] = f"step {ev['last_logged_step'] + 1}, checkpoint step-{step:08d} corrupted"
    return before


def await_restart(run: Run, ev: dict, before: dict[int, int], resumes: int, a) -> None:
    """All four workers replaced, the resume line, then a step past the resumed one."""
    t_kill = T0 + ev["t_s"]

    def replaced():
        w = run.workers()
        return len(w) == NPROC and not set(w.values()) & set(before.values()) and w

    ev["new_pids"] = list(wait_for(run, "a restarted worker group", replaced, a.hang_s).values())
    ev["workers_replaced_s"] = round(time.monotonic() - t_kill, 2)
    lines = wait_for(run, "a 'resuming from' line",
                     lambda: (r := run.grep(r"plait: resuming from")) and len(r) > resumes and r,
                     a.hang_s)
    m = RESUME_RE.search(lines[resumes])
    ev["resumed_from"] = int(m.group(2))
    wait_for(run, "a step after resuming", lambda: run.last_step() > ev["resumed_from"], a.hang_s)
    ev["first_new_step_s"] = round(time.monotonic() - t_kill, 2)
    say(f"  restarted: new pids {ev['new_pids']}, resumed from step {ev['resumed_from']}, "
        f"training again {ev['first_new_step_s']} s after the kill")


def read_metrics(run_dir: Path) -> list[dict]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def same(x, y) -> bool:
    """Bit-equal as JSON gives them (floats round-trip exactly); NaN equals NaN."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type(x) is type(y) and x == y


def compare(chaos: Path, ref: Path, steps: int) -> dict:
    out: dict = {}
    sc, sr = (json.loads((d / "summary.json").read_text()) for d in (chaos, ref))
    for k in ("final_train_loss", "final_val_loss", "steps", "skipped_steps"):
        out[k] = {"chaos": sc.get(k), "reference": sr.get(k), "equal": same(sc.get(k), sr.get(k))}
    mc, mr = read_metrics(chaos), read_metrics(ref)
    for name, recs in (("chaos", mc), ("reference", mr)):
        got = [r["step"] for r in recs]
        out[f"{name}_steps_once_in_order"] = got == list(range(1, steps + 1))
        dup = sorted({s for s in got if got.count(s) > 1})
        out[f"{name}_duplicated_steps"], out[f"{name}_missing_steps"] = \
            dup, sorted(set(range(1, steps + 1)) - set(got))
    byc, byr = {r["step"]: r for r in mc}, {r["step"]: r for r in mr}
    diffs = []
    for s in sorted(set(byc) & set(byr)):
        for k in COMPARED:
            if not same(byc[s].get(k), byr[s].get(k)):
                diffs.append({"step": s, "key": k, "chaos": byc[s].get(k),
                              "reference": byr[s].get(k)})
    out["per_step_differences"] = len(diffs)
    out["first_differences"] = diffs[:10]
    out["steps_compared"] = len(set(byc) & set(byr))
    out["skipped_records"] = {"chaos": [r["step"] for r in mc if r.get("skipped")],
                              "reference": [r["step"] for r in mr if r.get("skipped")]}
    out["resumed_from_records"] = [r["resumed_from"] for r in mc if "resumed_from" in r]
    out["final_checkpoint"] = compare_checkpoints(chaos, ref, steps)
    out["tensorboard_loss_points"] = {"chaos": tensorboard_points(chaos),
                                      "reference": tensorboard_points(ref)}
    return out


def tensorboard_points(run_dir: Path) -> dict | None:
    """Loss points in the run's TensorBoard files, as TensorBoard's reader sees them: metrics.jsonl
    drops a crashed session's records past its checkpoint, and the event files should agree."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    if not (run_dir / "tensorboard").is_dir():
        return None
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("loss")]
    return {"points": len(steps), "distinct_steps": len(set(steps)), "files":
            len(list((run_dir / "tensorboard").iterdir()))}


def compare_checkpoints(chaos: Path, ref: Path, steps: int) -> dict:
    """Key by key, the final checkpoints' contents: bytes differ anyway (pickled objects)."""
    import pickle
    import warnings

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    warnings.filterwarnings("ignore", category=UserWarning)  # DCP's single-process notes
    sds = []
    for d in (chaos, ref):
        flat = d / "final_state.pt"
        dcp_to_torch_save(d / "checkpoints" / f"step-{steps:08d}", flat)
        sds.append(torch.load(flat, weights_only=False))
    a, b = sds
    differ = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if torch.is_tensor(x) and torch.is_tensor(y):
            eq = (x.dtype == y.dtype and x.shape == y.shape
                  and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)))
        else:
            eq = pickle.dumps(x) == pickle.dumps(y)
        if not eq:
            differ.append(k)
    state = [k for k in differ if not k.startswith("rank")]  # model, optimizer, step, data position
    return {"keys": len(a), "differing_keys": differ,
            "model_optimizer_trainer_equal": not state and set(a) == set(b),
            "torch_rng_equal": not [k for k in differ if k.endswith("/rng/torch")]}


def chaos_run(a, cmd: list[str], run_dir: Path, plan: dict, record: dict) -> Run:
    run = Run(cmd, run_dir, a.work / "chaos_console.full.log")
    resumes = 0
    for i, ev in enumerate(plan["events"], 1):
        ev["n"] = i
        record["events"].append(ev)
        try:
            before = inject(run, ev, a)
            say(f"event {i}: {ev['kind']} rank {ev['rank']} (pid {ev['pid']}) at {ev['wall']}, "
                f"last logged step {ev['last_logged_step']}: hit {ev['hit']}")
            if ev["kind"] == "kill_in_save":
                say(f"  save in flight: {ev['save_dir']} holding {ev['save_files_at_kill']}; "
                    f"missed saves first: {ev['missed_saves']}")
            if ev["kind"] == "corrupt":
                say(f"  corrupted {ev['corrupted']['file']} ({ev['corrupted']['bytes']} bytes at "
                    f"{ev['corrupted']['offset']}); newest at kill: step {ev['newest_at_kill']}")
            await_restart(run, ev, before, resumes, a)
            resumes += 1
        except Hang as e:
            ev["hang"] = str(e)
            record["hang"] = {"event": i, "what": str(e), "workers": run.workers(),
                              "last_step": run.last_step(), "wall": now_iso()}
            say(f"HANG / FAILURE at event {i}: {e}")
            run.end()
            return run
    run.proc.wait()
    run.fh.close()
    run.poll_log()
    return run


def checks_of(record: dict, cmp_: dict, plan: dict) -> dict[str, bool]:
    """What the run must show; each a yes / no, printed and saved."""
    evs, lines = record["events"], record["console_lines"]
    by_kind = {e["kind"]: e for e in evs if e.get("why") is None}
    after_nan = [e for e in evs if e.get("why")]
    save, bad = by_kind["kill_in_save"], by_kind["corrupt"]
    bad_step = int(bad["corrupted"]["file"].split("/")[1][5:])
    return {
        "final train and val loss bit-identical":
            cmp_["final_train_loss"]["equal"] and cmp_["final_val_loss"]["equal"],
        "every step logged once, in order (chaos run)": cmp_["chaos_steps_once_in_order"],
        "per-step values bit-identical": cmp_["per_step_differences"] == 0,
        "NaN step skipped in both runs, only it":
            cmp_["skipped_records"]["chaos"] == cmp_["skipped_records"]["reference"]
            == [plan["nan_step"]],
        "one restart per kill, all four workers replaced":
            len(lines["resuming"]) == len(evs) and all(e.get("new_pids") for e in evs),
        "the kill after the NaN step resumed from the save owed to step nan+1":
            all(e.get("resumed_from") == plan["nan_step"] + 1 for e in after_nan),
        "the half-written save was not resumed from":
            save.get("resumed_from", 1 << 30) < int(save["save_dir"][-8:])
            or save.get("committed_anyway", False),
        "fell back from the damaged checkpoint, kept as .damaged":
            bool(lines["falling_back"]) and bad.get("resumed_from", 1 << 30) < bad_step
            and f"step-{bad_step:08d}.damaged" in record["chaos_checkpoints_left"],
        "final model, optimizer and trainer state bit-identical":
            cmp_["final_checkpoint"]["model_optimizer_trainer_equal"],
    }


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock, printed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--kills", type=int, default=6,
                    help="plain kills besides the one after the NaN step")
    ap.add_argument("--min-gap", type=int, default=20, help="steps between two planned events")
    ap.add_argument("--max-restarts", type=int, default=30)
    ap.add_argument("--hang-s", type=float, default=300.0, help="no progress this long: a hang")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="train.timeout_s of both runs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/plait-chaos"),
                    help="run folders (replaced)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "chaos")
    return ap.parse_args()


def main() -> int:
    global T0
    a = parse_args()
    seed = a.seed if a.seed is not None else int(time.time()) % 100000
    say(f"seed {seed}")
    plan = make_plan(random.Random(seed), a)
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    a.out.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(a.work)
    chaos_dir, ref_dir = a.work / "chaos", a.work / "reference"
    cmd = train_cmd(chaos_dir, corpus, a, plan["nan_rank"], plan["nan_step"])
    say(f"NaN fault: rank {plan['nan_rank']} at step {plan['nan_step']}; plan: "
        + ", ".join(f"{e['kind']}@{e['target_step']}/r{e['rank']}" for e in plan["events"]))
    say("command: " + " ".join(cmd[1:]))
    record = {"seed": seed, "date": now_iso(), "command": cmd[1:],
              "corpus_files": list(CORPUS_FILES), "corpus_bytes": corpus.stat().st_size,
              "nan_step": plan["nan_step"], "nan_rank": plan["nan_rank"], "events": [],
              "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                          "python": sys.version.split()[0]}}
    T0 = time.monotonic()
    run = chaos_run(a, cmd, chaos_dir, plan, record)
    record["chaos_wall_s"] = round(time.monotonic() - T0, 1)
    record["chaos_exit_code"] = run.proc.returncode
    record["console_lines"] = {
        "resuming": run.grep(r"plait: resuming from"), "falling_back": run.grep(r"Falling back"),
        "skipped": [f"{t:.1f} s: {ln}" for t, ln in run.lines if "skipped on every rank" in ln],
        "worker_failures": run.grep(r"failed \(exitcode")}
    ck = chaos_dir / "checkpoints"
    record["chaos_checkpoints_left"] = sorted(os.listdir(ck)) if ck.is_dir() else []
    (a.out / "chaos_console.log").write_text("".join(f"{t:7.1f}s {ln}\n" for t, ln in run.lines))
    say(f"chaos run: exit code {run.proc.returncode} after {record['chaos_wall_s']} s; "
        f"checkpoints left {record['chaos_checkpoints_left']}")
    ok = "hang" not in record and run.proc.returncode == 0
    if ok:
        t1 = time.monotonic()
        ref = Run(train_cmd(ref_dir, corpus, a, plan["nan_rank"], plan["nan_step"]), ref_dir,
                  a.work / "reference_console.full.log")
        ref.proc.wait()
        ref.fh.close()
        ref.poll_log()
        (a.out / "reference_console.log").write_text("".join(ln + "\n" for _, ln in ref.lines))
        record["reference_wall_s"] = round(time.monotonic() - t1, 1)
        record["reference_exit_code"] = ref.proc.returncode
        say(f"reference run: exit code {ref.proc.returncode} after {record['reference_wall_s']} s")
        ok = ref.proc.returncode == 0
    if ok:
        cmp_ = record["comparison"] = compare(chaos_dir, ref_dir, a.steps)
        for name, d in (("chaos", chaos_dir), ("reference", ref_dir)):
            shutil.copy(d / "summary.json", a.out / f"summary_{name}.json")
        checks = record["checks"] = checks_of(record, cmp_, plan)
        ok = all(checks.values())
        for k, v in checks.items():
            say(f"{'PASS' if v else 'FAIL'}  {k}")
        for k in ("final_train_loss", "final_val_loss"):
            say(f"{k}: chaos {cmp_[k]['chaos']!r}, reference {cmp_[k]['reference']!r}")
        fc = cmp_["final_checkpoint"]
        say(f"final checkpoints: {len(fc['differing_keys'])} of {fc['keys']} keys differ: "
            f"{fc['differing_keys']}")
        say(f"TensorBoard loss points: {cmp_['tensorboard_loss_points']}")
    record["total_wall_s"] = round(time.monotonic() - T0, 1)
    record["result"] = "pass" if ok else "fail"
    (a.out / "events.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    say(f"{record['result']}; {record['total_wall_s']} s in all; wrote {a.out / 'events.json'}")
    return 0 if ok else 1


T0 = time.monotonic()  # the chaos run's start: every event's t_s counts from here

if __name__ == "__main__":
    sys.exit(main())
