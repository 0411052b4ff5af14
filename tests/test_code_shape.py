"""The shape of the code, checked: no import cycles, every module importable alone, files within
their line budget. `.ci/run` runs this file besides `make test` (it is part of it too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from import_graph import graph

PLAIT = Path(__file__).resolve().parent.parent / "plait"
LINE_BUDGET = 400  # a file past this is a sign to split it (README, "Contributing")


def _edges(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Module -> plait modules it makes Python run: each import, and the parent packages of what it
    imports (importing a.b.c runs a.b's __init__ first),
    except its own packages (already running)."""
    out: dict[str, set[str]] = {}
    for mod, names in imports.items():
        deps = set()
        for name in names:
            while name and name not in imports:  # `from m import function`: the module m
                name = name.rpartition(".")[0]
            while name:
                if name != mod and not mod.startswith(name + "."):
                    deps.add(name)
                name = name.rpartition(".")[0]
        out[mod] = deps
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_plait_has_no_import_cycle():
    assert cycles(_edges(graph(PLAIT))) == []


def test_the_cycle_check_finds_one():
    edges = _edges({"p": set(), "p.a": {"p.b"}, "p.b": {"p.c.x"}, "p.c": {"p.a"}, "p.c.x": set()})
    # p.b -> p.c.x runs p.c's __init__, which imports p.a
    assert cycles(edges) == [["p.a", "p.b", "p.c"]]


FRESH_IMPORTS = """
import importlib, os, sys, traceback
import numpy, torch, torch.distributed  # third-party modules preloaded once: plait's own order is tested
assert not any(m == "plait" or m.startswith("plait.") for m in sys.modules)
bad = []
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child imports one plait module into an interpreter that holds none
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().strip().splitlines()[-1].encode()[:500])
            code = 1
        os._exit(code)
    os.close(w)
    msg = os.read(r, 1000).decode()
    os.close(r)
    if os.waitpid(pid, 0)[1] != 0:
        bad.append(name + ": " + msg)
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""  # noqa: E501 - the script's own text: its long comment line is part of the string


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each plait module first, alone (a forked child of an interpreter holding no plait module): an
    import that works only after another module happened to be imported shows here."""
    mods = sorted(graph(PLAIT))
    r = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *mods], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_fresh_import_check_can_fail(tmp_path):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from cyc.a import A\nB = 2\n")
    r = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, "cyc.a"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and "cyc.a" in r.stdout and "partially initialized" in r.stdout


def test_files_keep_to_the_line_budget():
    long = {str(p.relative_to(PLAIT.parent)): n for p in PLAIT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > LINE_BUDGET}
    assert long == {}, f"files over {LINE_BUDGET} lines (split them): {long}"
