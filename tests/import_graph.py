"""plait's import graph, read from the source with `ast` (nothing is imported or run).

`module_imports(path)` lists what one file imports: every `import` and `from ... import`, at module
level or inside functions and `if TYPE_CHECKING:` blocks alike, relative ones resolved against the
file's own dotted name (found by walking up the folders that hold an `__init__.py`). For
`from pkg import name`, both `pkg` and, when it is a module or package beside it on disk,
`pkg.name` are listed. Names are as imported: the parent packages Python also imports
(`plait.models` for `plait.models.gpt`) are not added. `importlib.import_module` strings are not
seen.
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(path: Path) -> tuple[str, Path]:
    """(dotted name of the module at `path`, the folder holding its top-level package)."""
    path = Path(path).resolve()
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts), folder


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def module_imports(path: str | Path) -> set[str]:
    """Dotted names of the modules the file at `path` imports (see the module docstring)."""
    path = Path(path)
    name, root = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from ..x import y` in package a.b.c: a.b.x (one level = the package)
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module
            out.add(base)
            subs = (f"{base}.{a.name}" for a in node.names)
            out.update(s for s in subs if _is_module(root, s))
    out.discard("")
    return out


def graph(package_dir: str | Path) -> dict[str, set[str]]:
    """Every module under `package_dir` (a package folder) -> the names it imports."""
    return {module_name(p)[0]: module_imports(p) for p in sorted(Path(package_dir).rglob("*.py"))}
