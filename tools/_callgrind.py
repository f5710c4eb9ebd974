"""The one callgrind runner the cost tools share (``request_cost.py``, ``http_cost.py``).

Imported by its bare name: each tool runs as ``python tools/<tool>.py``, which
puts this folder first on ``sys.path``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys


def instructions(args: list[str], what: str) -> int:
    """Total instructions callgrind counts for ``python *args*`` (a whole
    child process, ``PYTHONHASHSEED=0`` so every child lays out its dicts
    alike). :raises RuntimeError: naming *what*, if the child fails."""
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, *args],
        capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, PYTHONHASHSEED="0"))
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return int(match.group(1))
