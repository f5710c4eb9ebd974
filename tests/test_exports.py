"""The public surface: ``__all__`` matches what the package really exports,
and SPEC's names (a contract: code outside this repo calls them) all exist."""

from __future__ import annotations

import importlib
import inspect
import sys

import asl_gevent
from helpers import run_python


def test_all_matches_public_names() -> None:
    """Every public module attribute is in __all__ and every __all__ name exists."""
    public = {name for name in vars(asl_gevent)
              if not name.startswith("_")
              and not inspect.ismodule(getattr(asl_gevent, name))}
    assert set(asl_gevent.__all__) == public
    for name in asl_gevent.__all__:
        assert getattr(asl_gevent, name) is not None


def test_spec_api_names() -> None:
    """SPEC's Public API, including Node's camelCase aliases."""
    from asl_gevent import AsyncLocalStorage, AsyncResource, install, is_installed, uninstall

    als = AsyncLocalStorage(name="request", default=None)
    for name in ("run", "get_store", "enter_with", "exit", "disable", "name", "default",
                 "scope", "bind", "snapshot", "getStore", "enterWith"):
        assert hasattr(als, name), name
    assert callable(AsyncLocalStorage.bind) and callable(AsyncLocalStorage.snapshot)
    res = AsyncResource("type")
    for name in ("run_in_async_scope", "runInAsyncScope", "bind"):
        assert hasattr(res, name), name
    assert all(callable(f) for f in (install, uninstall, is_installed))


def test_detached_work_names() -> None:
    """Issue 9's public names: detached work at the root, run info in debug."""
    from asl_gevent import (KNOWN_STARTERS, detach_starter, detached, run_detached,
                            undetach_starter)
    from asl_gevent.debug import (format_run_info, install_signal_handler, print_run_info,
                                  uninstall_signal_handler)

    assert all(callable(f) for f in (detach_starter, detached, run_detached, undetach_starter,
                                     format_run_info, print_run_info, install_signal_handler,
                                     uninstall_signal_handler))
    assert "sentry_sdk.worker:BackgroundWorker.start" in KNOWN_STARTERS


def test_integrations_are_not_imported_by_the_package() -> None:
    """gunicorn stays optional: importing asl_gevent imports no integration."""
    proc = run_python("""
        import sys, asl_gevent
        print(sorted(m for m in sys.modules
                     if m.startswith(('asl_gevent.wsgi', 'asl_gevent.gunicorn',
                                      'asl_gevent.logfilter', 'asl_gevent.bench', 'gunicorn',
                                      'asl_gevent.debug', 'asl_gevent._watch',
                                      'asl_gevent.http', 'asl_gevent.celery', 'celery',
                                      'requests', 'urllib3'))))
    """)
    assert proc.stdout.strip() == "[]"


def test_integration_modules_import() -> None:
    """The public integration modules exist under SPEC's names."""
    for name in ("asl_gevent.wsgi", "asl_gevent.logfilter", "asl_gevent.gunicorn",
                 "asl_gevent.debug"):
        importlib.import_module(name)
    assert hasattr(sys.modules["asl_gevent.gunicorn"], "GeventWorker")
    http = importlib.import_module("asl_gevent.http")
    assert all(callable(getattr(http, name)) for name in ("install", "uninstall"))
    celery = importlib.import_module("asl_gevent.celery")
    assert callable(celery.install)
    assert celery.task_storage.get_store() is None


def test_py_typed_is_shipped() -> None:
    """py.typed ships with the package (PEP 561)."""
    from pathlib import Path

    assert (Path(asl_gevent.__file__).parent / "py.typed").exists()
