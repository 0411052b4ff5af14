"""The inputs of `plait data prepare`: which files, cut into tasks, read back as documents.

A document is one text file, one JSON line (its `field`), or one parquet row (its `field`
column). Inputs are cut into pieces (small files whole, big .jsonl files at byte offsets, parquet
files at row-group boundaries) and the pieces packed into tasks of about `task_bytes` each. The
cut depends only on the inputs and `task_bytes`, never on the number of workers, so the output
is byte-identical for any --workers.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from plait.data.corpus import TEXT_SUFFIXES, stdlib_files
from plait.errors import ConfigError

# sft: every input is .jsonl / .jsonl.gz fine-tuning records (plait.data.sft)
FORMATS = ("auto", "text", "jsonl", "parquet", "sft")
# an input naming the running Python's standard library sources: plait's default corpus as text
STDLIB = "python:stdlib"


def read_as(name: str, fmt: str) -> str:
    """How a file is read: text | jsonl | jsonl.gz | parquet (auto: by its suffix)."""
    name = name.lower()
    fmt = "jsonl" if fmt == "sft" else fmt
    if fmt == "auto":
        fmt = ("jsonl" if name.endswith((".jsonl", ".jsonl.gz"))
               else "parquet" if name.endswith(".parquet") else "text")
    return "jsonl.gz" if fmt == "jsonl" and name.endswith(".gz") else fmt


def kind_of(path: Path, fmt: str) -> str:
    """How a file found in a folder is read, or '' when the walk skips it (unknown suffix)."""
    if not (path.name.lower().endswith((".jsonl", ".jsonl.gz", ".parquet"))
            or path.suffix in TEXT_SUFFIXES):
        return ""
    return read_as(path.name, fmt)


@dataclass(frozen=True)
class Piece:
    path: str
    kind: str
    start: int = 0  # jsonl: first byte; parquet: first row group
    end: int = -1  # jsonl: end byte; parquet: end row group; -1: to the end
    size: int = 0  # bytes on disk this piece stands for (progress and task packing)


@dataclass(frozen=True)
class Task:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


def discover(inputs: list[str], fmt: str = "auto") -> list[tuple[Path, str]]:
    """(file, kind) for every input, folders walked in sorted order; hidden entries skipped.

    The input `python:stdlib` stands for the standard library's .py files (site-packages left
    out), the files of plait's default corpus.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    found: list[tuple[Path, str]] = []
    for arg in inputs:
        p = Path(arg)
        if arg == STDLIB:
            found += [(f, "text") for f in stdlib_files()]
        elif p.is_file():  # named explicitly: read whatever its suffix
            found.append((p, read_as(p.name, fmt)))
        elif p.is_dir():
            inside = []
            for f in sorted(p.rglob("*")):
                hidden = any(part.startswith(".") for part in f.relative_to(p).parts)
                kind = kind_of(f, fmt) if f.is_file() and not hidden else ""
                if kind:
                    inside.append((f, kind))
            if not inside:
                raise ConfigError(f"input {arg!r} holds no text, .jsonl, .jsonl.gz or .parquet "
                                  f"files: point at a folder of those or name the files")
            found += inside
        else:
            raise ConfigError(f"input {arg!r} does not exist: name text / .jsonl / .jsonl.gz / "
                              f".parquet files or folders holding them")
    return found


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"{path}: reading parquet needs pyarrow: pip install pyarrow "
                          f"(or pip install 'plait[data]')") from e
    try:
        return pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise ConfigError(f"{path} is not a readable parquet file ({e}): fix or remove it") from e


def pieces_of(path: Path, kind: str, task_bytes: int) -> list[Piece]:
    size = path.stat().st_size
    if kind == "jsonl" and size > task_bytes:  # a line belongs to the piece its first byte is in
        return [Piece(str(path), kind, a, min(a + task_bytes, size), min(task_bytes, size - a))
                for a in range(0, size, task_bytes)]
    if kind == "parquet":
        meta = _parquet_file(path).metadata
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        total = sum(sizes) or 1
        out, first, acc = [], 0, 0
        for i, s in enumerate(sizes):
            acc += s
            if acc >= task_bytes or i == len(sizes) - 1:
                out.append(Piece(str(path), kind, first, i + 1, size * acc // total))
                first, acc = i + 1, 0
        return out or [Piece(str(path), kind, 0, 0, size)]
    return [Piece(str(path), kind, 0, -1, size)]


def plan_tasks(files: list[tuple[Path, str]], task_bytes: int) -> list[Task]:
    """Pieces in input order, packed into tasks of at least task_bytes (the last may be smaller)."""
    tasks: list[Task] = []
    group: list[Piece] = []
    size = 0
    for path, kind in files:
        for piece in pieces_of(path, kind, task_bytes):
            group.append(piece)
            size += piece.size
            if size >= task_bytes:
                tasks.append(Task(len(tasks), tuple(group)))
                group, size = [], 0
    if group:
        tasks.append(Task(len(tasks), tuple(group)))
    return tasks


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1


def _field(obj, field: str, where: Callable[[], str]) -> str | None:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where()} is a JSON {type(obj).__name__}, not an object: each line "
                          f"must be an object with a {field!r} field")
    if field not in obj:
        raise ConfigError(f"{where()} has no field {field!r} (it has: "
                          f"{', '.join(list(obj)[:10])}): pass --field NAME")
    text = obj[field]
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{where()}: field {field!r} is a {type(text).__name__}, not text: pass "
                          f"--field naming a text field")
    return text


def _jsonl_lines(piece: Piece, progress: Callable[[int], None]) -> Iterator[tuple[bytes, Callable]]:
    """(line, where) for each line of the piece; `where()` names file and line for errors."""
    if piece.kind == "jsonl.gz":
        with open(piece.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as fh:
            seen, n = 0, 0
            try:
                for line in fh:
                    n += 1
                    yield line, (lambda n=n: f"{piece.path} line {n}")
                    if raw.tell() - seen >= 1 << 20:
                        progress(raw.tell() - seen)
                        seen = raw.tell()
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                raise ConfigError(f"{piece.path}: broken gzip stream after line {n} ({e}): "
                                  f"re-compress or remove the file") from e
            progress(piece.size - seen)
        return
    with open(piece.path, "rb") as fh:
        pos = piece.start
        if pos > 0:  # skip the line that began in the previous piece
            fh.seek(pos - 1)
            pos += len(fh.readline()) - 1
        end = piece.end if piece.end >= 0 else piece.size
        seen = piece.start  # progress reported up to here; the piece stands for [start, end)
        while pos < end:
            line = fh.readline()
            if not line:
                break
            yield line, (lambda p=pos: f"{piece.path} line {_line_number(piece.path, p)}")
            pos += len(line)
            if min(pos, end) - seen >= 1 << 20:
                progress(min(pos, end) - seen)
                seen = min(pos, end)
        progress(end - seen)


def read_documents(task: Task, field: str, progress: Callable[[int], None],
                   parse: Callable | None = None) -> Iterator:
    """The task's documents in input order: bytes for text files, str for JSON lines and parquet.

    `parse(obj, where)`: what a JSON line becomes instead of its `field` (a fine-tuning record's
    segments, plait.data.sft), None to skip it; `where()` names the file and line for errors.
    Empty documents are skipped (they would add nothing but an end-of-text id).
    """
    for piece in task.pieces:
        if piece.kind == "text":
            data = Path(piece.path).read_bytes()
            if data:
                yield data
            progress(piece.size)
        elif piece.kind in ("jsonl", "jsonl.gz"):
            for line, where in _jsonl_lines(piece, progress):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    raise ConfigError(f"{where()} is not JSON ({e}): fix or remove the line") from e
                text = _field(obj, field, where) if parse is None else parse(obj, where)
                if text:
                    yield text
        else:
            yield from _parquet_documents(piece, field, progress)


def _parquet_documents(piece: Piece, field: str, progress: Callable[[int], None]) -> Iterator[str]:
    pf = _parquet_file(Path(piece.path))
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{piece.path} has no column {field!r} (columns: "
                          f"{', '.join(names[:10])}): pass --field NAME")
    import pyarrow as pa

    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{piece.path}: column {field!r} is {kind}, not text: pass --field "
                          f"naming a string column")
    groups = list(range(piece.start, piece.end))
    if not groups:  # a file with no row groups holds no rows (pyarrow would read all groups for [])
        progress(piece.size)
        return
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text
    progress(piece.size)
