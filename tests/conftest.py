"""Shared fixtures.

``monkey.patch_all()`` never runs in this process: patched scenarios run as
subprocesses (see :func:`helpers.run_python`) and the tests assert on their
output.
"""

from __future__ import annotations

import contextvars
from typing import Iterator

import pytest
from gevent import monkey

from asl_gevent import AsyncLocalStorage, install, is_installed, uninstall


@pytest.fixture(autouse=True, name="hooks")
def _hooks() -> Iterator[None]:
    """Every test starts with the hooks installed; teardown removes them,
    even after a failure, so one test's state never reaches the next. And
    no test patches this process (the rule above): one that does fails here."""
    install()
    try:
        yield
    finally:
        uninstall()
    assert not monkey.is_anything_patched(), \
        "monkey.patch_*() ran in the pytest process: run patched scenarios in a subprocess"


@pytest.fixture(name="no_hooks")
def _no_hooks(hooks: None) -> Iterator[None]:
    """Negative control: the hooks are removed for the test."""
    uninstall()
    assert not is_installed()
    yield


@pytest.fixture(name="als")
def _als() -> AsyncLocalStorage[object]:
    return AsyncLocalStorage(name="test")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool:
    """Run each test body in its own copy of the context.

    A test that calls ``enter_with`` in the main greenlet (as Node's tests do
    at top level) then cannot leave a store behind for the next test.
    """
    funcargs = pyfuncitem.funcargs
    names = pyfuncitem._fixtureinfo.argnames
    contextvars.copy_context().run(pyfuncitem.obj, **{n: funcargs[n] for n in names})
    return True


# -- cross-process tests (issue 10): one real redis-server per session ----------

_redis_dbs = iter(range(1, 64))


@pytest.fixture(scope="session", name="redis_base")
def _redis_base() -> Iterator[str]:
    """A throwaway redis-server on a free 127.0.0.1 port for the whole session,
    stopped by its pid at the end. Fails (never skips) without redis-server."""
    from xproc_helpers import redis_server
    with redis_server() as url:
        yield url


@pytest.fixture(name="broker")
def _broker(redis_base: str) -> str:
    """A Redis URL on a database of its own: no test sees another's messages."""
    return f"{redis_base}/{next(_redis_dbs)}"
