"""The examples in the modules' docstrings run as written, module by module.

README.md's examples run one block at a time in tests/test_readme.py; the
docs site's, one session per page, in tests/test_docs_build.py.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["asl_gevent._storage", "asl_gevent._resource", "asl_gevent._detach",
           "asl_gevent.debug", "asl_gevent.wsgi", "asl_gevent.logfilter", "asl_gevent.gunicorn",
           "asl_gevent.http", "asl_gevent._baggage", "asl_gevent.celery"]


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples(name: str) -> None:
    """Module docstrings teach with doctests (as gevent's local.py does)."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
