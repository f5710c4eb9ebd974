"""The examples in README.md and in the modules' docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

from helpers import ROOT

MODULES = ["asl_gevent._storage", "asl_gevent._resource", "asl_gevent._detach",
           "asl_gevent.debug", "asl_gevent.wsgi", "asl_gevent.logfilter", "asl_gevent.gunicorn",
           "asl_gevent.http", "asl_gevent._baggage", "asl_gevent.celery"]


def test_readme_examples() -> None:
    """Every `>>>` example in README.md gives the output shown."""
    result = doctest.testfile(str(ROOT / "README.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10
    assert result.failed == 0


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples(name: str) -> None:
    """Module docstrings teach with doctests (as gevent's local.py does)."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
