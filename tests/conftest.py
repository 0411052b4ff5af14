import sysconfig
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> str:
    """A small, fixed text corpus (~250 KB of standard-library source) for fast tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "difflib.py", "textwrap.py", "fractions.py", "statistics.py"]
    text = b"".join((root / n).read_bytes() for n in names)
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_bytes(text[:250_000])
    return str(p)
