"""The README's promise: "Every snippet below runs as written on a CPU after `make setup`".

Each ```python block of its Use section runs in a fresh interpreter, except the one that needs a
process group (torch.distributed; tests/test_distributed.py runs that path). A snippet that
breaks when the API changes fails here instead of in a reader's hands.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def use_snippets():
    text = README.read_text()
    start = text.index("\n## Use")
    end = text.find("\n## ", start + 5)
    section = text[start:end if end > 0 else None]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return [b for b in blocks if "flashlite import distributed" not in b]


SNIPPETS = use_snippets()


def test_the_use_section_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_written(index):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHLITE_POISON")}
    run = subprocess.run([sys.executable, "-c", SNIPPETS[index]], capture_output=True, text=True, timeout=300,
                         env=env, cwd=README.parent)
    assert run.returncode == 0, f"README snippet {index} failed:\n{SNIPPETS[index]}\n{run.stderr[-3000:]}"
