"""``python -m asl_gevent.bench``: the table has every figure, and runs.

The benchmark is a report, so nothing here looks at a time or a ratio's
value: a slow or noisy machine must not fail the suite. What must hold is the
table's shape -- every figure present, its ratios numbers, its target and mark
printed -- and the command line (``--quick``, ``--only``, ``--list``,
``--repeat``). The full ``--quick`` run starts real gunicorn and pywsgi
servers and a load client, so it runs once per session.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from typing import Any, Dict, List

import pytest

from asl_gevent.bench import instructions
from asl_gevent.bench.__main__ import NAMES
from helpers import ROOT

MARKS = {"PASS", "pass*", "MISS", "-"}
TARGET_RE = re.compile(r"^(<=|>=|==) \d+\.\d\d( \(wall (<=|>=|==) \d+\.\d\d\))?$")


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``python -m asl_gevent.bench ARGS``; the child is killed on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "asl_gevent.bench", *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))


def table_rows(stdout: str) -> Dict[str, List[str]]:
    """The table's data rows, by figure name, as lists of stripped cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 2, stdout
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["figure", "subject vs baseline", "baseline", "subject",
                      "instructions/op", "instr", "min", "median", "target", "mark"], stdout
    assert set(lines[1]) <= {"|", "-"}, stdout
    rows: Dict[str, List[str]] = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        assert cells[0] not in rows, f"figure {cells[0]} printed twice"
        rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module", name="quick")
def _quick() -> subprocess.CompletedProcess[str]:
    return bench("--quick")


@pytest.mark.slow
def test_quick_run_prints_every_figure_with_numeric_ratios(
        quick: subprocess.CompletedProcess[str]) -> None:
    """--quick exits 0 and prints one row per figure, in order: two ratios
    that parse as finite numbers, the SPEC target (or '-') and a mark."""
    assert quick.returncode == 0, quick.stdout + quick.stderr
    rows = table_rows(quick.stdout)
    assert list(rows) == NAMES
    for name, (_, what, base, subj, counted, instr, ratio_min, ratio_median, target,
               mark) in rows.items():
        assert what and base and subj, name
        assert (counted, instr) == ("-", "-"), name  # --quick counts no instructions
        assert math.isfinite(float(ratio_min)), (name, ratio_min)
        assert math.isfinite(float(ratio_median)), (name, ratio_median)
        assert target == "-" or TARGET_RE.match(target), (name, target)
        assert mark in MARKS, (name, mark)
        assert (target == "-") == (mark == "-"), name


@pytest.mark.slow
def test_quick_run_reports_machine_and_every_miss(
        quick: subprocess.CompletedProcess[str]) -> None:
    """The report names the machine and versions, and lists every figure
    marked MISS under the table; nothing failed to measure."""
    out = quick.stdout
    assert re.search(r"^date: \d{4}-\d\d-\d\d", out, re.M), out
    assert re.search(r"^machine: \d+ CPUs", out, re.M), out
    assert re.search(r"^python 3\.\d+.*gevent \d.*greenlet \d.*gunicorn", out, re.M), out
    assert "FAILED TO MEASURE" not in out
    missed = {name for name, cells in table_rows(out).items() if cells[-1] == "MISS"}
    listed = set(re.findall(r"^MISSED TARGET: (\S+):", out, re.M))
    assert listed == missed
    if not missed and "noisy:" not in out:
        assert "all targets met" in out


def test_only_runs_just_the_named_figure() -> None:
    """--only NAME prints that figure alone; the exit status is 0."""
    proc = bench("--quick", "--only", "run/token_wrapper")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(table_rows(proc.stdout)) == ["run/token_wrapper"]


def test_only_takes_a_group_and_repeat() -> None:
    """--only GROUP selects every GROUP/... figure; --repeat sets the pairs."""
    proc = bench("--quick", "--only", "get_store", "--repeat", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(table_rows(proc.stdout)) == [n for n in NAMES if n.startswith("get_store/")]
    assert "2 pairs per microbenchmark" in proc.stdout


@pytest.mark.skipif(not instructions.available(), reason="valgrind is not installed")
@pytest.mark.instructions  # the bench's plumbing, the same on every CPython: once, in CI
def test_callgrind_adds_instruction_counts_to_a_micro_row() -> None:
    """--callgrind fills the instruction columns of a micro row: instructions
    per operation of each side and their ratio, which the mark is judged on."""
    proc = bench("--quick", "--callgrind", "--only", "run/token_wrapper", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = table_rows(proc.stdout)["run/token_wrapper"]
    base, subj = (float(x.replace(",", "")) for x in cells[4].split(" -> "))
    assert 0 < base < subj
    assert float(cells[5]) == pytest.approx(subj / base, abs=0.001)
    assert "instructions: callgrind" in proc.stdout


def test_list_prints_every_figure_name() -> None:
    """--list prints the names --only accepts, one a line."""
    proc = bench("--list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == NAMES


@pytest.mark.parametrize("args, message", [
    (("--only", "nosuch"), r"--only 'nosuch' names no figure; choose from: get_store/contextvar"),
    (("--repeat", "0"), r"--repeat must be at least 1"),
])
def test_bad_options_exit_2_with_a_clear_message(args: tuple[str, ...], message: str) -> None:
    """A figure name that does not exist, or --repeat 0, is refused by the
    command line (exit 2) with a message saying what to pass, before any run."""
    proc = bench(*args)
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr
    assert "|" not in proc.stdout


def test_gunicorn_figures_say_skipped_when_gunicorn_is_missing() -> None:
    """Without gunicorn, the gunicorn figures are each reported skipped, with
    the install command, in one line each (not a server's traceback under
    figure names run together), and the run exits 0 like the other missing
    extras. ``sys.modules['gunicorn'] = None`` makes the import fail here as it
    does where gunicorn is not installed; no server is started."""
    source = ("import sys; sys.modules['gunicorn'] = None\n"
              "from asl_gevent.bench.__main__ import main\n"
              "sys.exit(main(['--quick', '--only', 'wsgi/gunicorn', "
              "'--only', 'wsgi/gunicorn_cpu', '--only', 'run']))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("wsgi/gunicorn", "wsgi/gunicorn_cpu"):
        assert (f"{name}: skipped: gunicorn not installed "
                f"(pip install 'asl_gevent[gunicorn]')") in lines, proc.stdout
    assert not [line for line in lines if "FAILED" in line], proc.stdout
    assert list(table_rows(proc.stdout)) == ["run/token_wrapper"]
    assert "gunicorn not installed" in lines[2]  # the machine line says so too


def test_cross_process_figures_say_skipped_when_an_extra_is_missing(tmp_path: Any) -> None:
    """Without celery or requests importable (shadowed here), their figures are
    skipped with a reason, the run still exits 0, the rest of the table prints."""
    for name in ("celery", "requests"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('no {name} here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    proc = subprocess.run([sys.executable, "-m", "asl_gevent.bench", "--quick",
                           "--only", "http", "--only", "celery", "--only", "run"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "celery/solo: skipped: celery not installed (pip install 'asl_gevent[celery]')" \
        in proc.stdout.splitlines()
    assert "http/requests_get: skipped: requests not installed (pip install " \
        "'asl_gevent[http]')" in proc.stdout.splitlines()
    assert list(table_rows(proc.stdout)) == ["run/token_wrapper"]
