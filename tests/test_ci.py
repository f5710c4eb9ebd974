"""CI's own pieces: the support matrix says what setup.cfg says, and
``.ci/gevent-suite`` reads gevent's runner output right (which file, which
test), since a misread there would turn a broken test into a silent pass."""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import re
import sys
import types

import pytest
from packaging.version import Version
from helpers import ROOT

CI = ROOT / ".ci"
pytestmark = pytest.mark.skipif(not (CI / "gevent-suite").exists(),
                                reason="CI files are not shipped in this tree (an sdist)")


def lower_bounds() -> dict[str, str]:
    """``name -> minimum version`` from setup.cfg's install_requires and gunicorn extra."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = (cfg["options"]["install_requires"] + "\n"
             + cfg["options.extras_require"]["gunicorn"]).splitlines()
    bounds = {}
    for line in filter(None, map(str.strip, lines)):
        match = re.fullmatch(r"([\w.-]+)\s*>=\s*([\w.]+)", line.split(";")[0].strip())
        assert match, f"setup.cfg requirement without a '>=' lower bound: {line!r}"
        bounds[match.group(1).lower()] = match.group(2)
    return bounds


def test_min_versions_are_setup_cfg_lower_bounds() -> None:
    """tox's `min` environment installs exactly the lowest versions setup.cfg allows."""
    pins = {}
    for line in (CI / "min-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    # packaging is in the gunicorn extra only because gunicorn 27's gevent
    # worker imports it; the min environment takes whatever sphinx needs.
    bounds = {k: v for k, v in lower_bounds().items() if k != "packaging"}
    assert set(bounds) == {"gevent", "greenlet", "gunicorn"}
    # Compared as versions: "23.0" and "23.0.0" are the same release.
    assert {k: Version(v) for k, v in pins.items()} == {k: Version(v) for k, v in bounds.items()}


def test_tox_runs_every_supported_python_and_fails_on_a_missing_one() -> None:
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    envs = {e.strip() for e in tox["tox"]["env_list"].split(",")}
    assert envs == {"py310", "py311", "py312", "py313", "min"}
    assert tox["tox"]["skip_missing_interpreters"].strip() == "false"


def load_suite() -> types.ModuleType:
    path = str(CI / "gevent-suite")
    loader = importlib.machinery.SourceFileLoader("gevent_suite", path)
    spec = importlib.util.spec_from_loader("gevent_suite", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gevent_suite"] = module  # its dataclasses look their module up there
    try:
        loader.exec_module(module)
    finally:
        del sys.modules["gevent_suite"]
    return module


# Shaped like gevent 26's runner output in quiet mode (colour codes included):
# a combined group that failed, a single file that failed, a file that passed.
# (test__c's header is in Python 3.10's format.)
RUNNER_OUTPUT = """\
\x1b[0mRunning tests in parallel with concurrency 2\x1b[0m
\x1b[1;31m| GEVENTTEST_USE_RESOURCES=-network-urlfetch /v/bin/python -u -m unittest gevent.tests.test__a gevent.tests.test__b\x1b[0m
  ======================================================================
  FAIL: test_x (gevent.tests.test__b.TestB.test_x)
  ----------------------------------------------------------------------
  Traceback (most recent call last):
    File "/v/gevent/tests/test__b.py", line 3, in test_x
  AssertionError: 1 != 2
  \n  ----------------------------------------------------------------------
  Ran 7 tests in 0.1s
\x1b[1;31m! GEVENTTEST_USE_RESOURCES=-network-urlfetch /v/bin/python -u -m unittest gevent.tests.test__a gevent.tests.test__b [code 1] \x1b[1;35m[Ran 7 tests in 0.2s]\x1b[0m
\x1b[1;31m| GEVENTTEST_USE_RESOURCES=-network-urlfetch /v/bin/python -u -mgevent.tests.test__c\x1b[0m
  ======================================================================
  ERROR: test_y (__main__.TestC)
  ----------------------------------------------------------------------
  Traceback (most recent call last):
  KeyError: 'run'
  \n\x1b[1;31m! GEVENTTEST_USE_RESOURCES=-network-urlfetch /v/bin/python -u -mgevent.tests.test__c [code 1] [took 0.4s]\x1b[0m
- GEVENTTEST_USE_RESOURCES=-network-urlfetch /v/bin/python -u -mgevent.tests.test__d [Ran 3 tests in 0.3s]
2/3 tests failed in 00:02
Ran 11 tests\x1b[1;33m (skipped=2)\x1b[0m in 3 files in 00:02
"""


def test_gevent_suite_reads_which_file_and_test_failed() -> None:
    suite = load_suite()
    failures, ran, skipped = suite.parse(RUNNER_OUTPUT)
    assert (ran, skipped) == (11, 2)
    assert set(failures) == {"gevent.tests.test__a", "gevent.tests.test__c"}
    group = failures["gevent.tests.test__a"]
    assert group.modules == ["gevent.tests.test__a", "gevent.tests.test__b"]
    assert list(group.tests) == ["gevent.tests.test__b.TestB.test_x"]
    assert suite.summary(group.tests["gevent.tests.test__b.TestB.test_x"]) == "AssertionError: 1 != 2"
    # `python -m gevent.tests.test__c` names its tests __main__.*: mapped back to the file;
    # Python < 3.11 prints "test_y (module.Class)", without the method in the brackets.
    single = failures["gevent.tests.test__c"]
    assert list(single.tests) == ["gevent.tests.test__c.TestC.test_y"]
    assert suite.summary(single.tests["gevent.tests.test__c.TestC.test_y"]) == "KeyError: 'run'"


def test_find_pythons_names_the_missing_version() -> None:
    import subprocess

    proc = subprocess.run([str(CI / "find-pythons"), "3.99"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "CPython 3.99 not found" in proc.stderr
    assert proc.stdout == ""
