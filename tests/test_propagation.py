"""SPEC's propagation matrix, with and without ``monkey.patch_all``.

Every spawn path in :mod:`matrix` is run by 200 concurrent requests, each in
its own ``run()``; each child sleeps a random while and reports its store.
With the hooks, every report is exactly its own request's id; with the hooks
removed (negative control), the child sees nothing. Patched scenarios run
``tests/matrix.py`` in a subprocess and check its JSON lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import random
import sys
import threading
from typing import Any

import gevent
import gevent._abstract_linkable
import gevent.baseserver
import gevent.hub
import gevent.pywsgi
import gevent.threadpool
import pytest
from gevent.greenlet import Greenlet

import asl_gevent
from asl_gevent import AsyncLocalStorage
from helpers import ROOT, run_python, run_scenario
from matrix import EXECUTOR, EXECUTOR_PATHS, GREENLET_PATHS, isolation

ALL_PATHS = {**GREENLET_PATHS, **EXECUTOR_PATHS}
var: contextvars.ContextVar[str] = contextvars.ContextVar("propagation_var", default="unset")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(20261125)


@pytest.mark.parametrize("path", ALL_PATHS, ids=list(ALL_PATHS))
def test_child_sees_spawner_store_and_siblings_are_isolated(
        path: str, als: AsyncLocalStorage[str]) -> None:
    """200 concurrent requests; each child sees exactly its own request's store."""
    seen = isolation(ALL_PATHS[path], als, requests=200)
    wrong = {request: got for request, got in seen.items() if got != request}
    assert len(seen) == 200 and not wrong


@pytest.mark.parametrize("path", ALL_PATHS, ids=list(ALL_PATHS))
def test_negative_control_without_hooks(path: str, als: AsyncLocalStorage[str],
                                        no_hooks: None) -> None:
    """Hooks removed: the child starts with an empty context and sees nothing."""
    seen = isolation(ALL_PATHS[path], als, requests=5)
    assert set(seen.values()) == {None}


@pytest.mark.parametrize("path", list(GREENLET_PATHS)[:6] + ["Pool.spawn", "gevent.spawn_raw"])
def test_child_writes_do_not_reach_parent(path: str, als: AsyncLocalStorage[str]) -> None:
    """A child's enter_with / ContextVar.set stays in the child."""
    def child() -> Any:
        als.enter_with("child-wrote")
        var.set("child-wrote")
        return als.get_store()

    def request() -> Any:
        return GREENLET_PATHS[path](child), als.get_store(), var.get()

    assert als.run("parent", request) == ("child-wrote", "parent", "unset")


# -- row 1: capture time and preset contexts ------------------------------------


def test_context_is_captured_at_start_not_creation(als: AsyncLocalStorage[str]) -> None:
    """Greenlet(fn) made in one run and started in another sees the start-time store."""
    g = als.run("created", Greenlet, als.get_store)
    als.run("started", g.start)
    assert g.get(timeout=5) == "started"


def test_preset_gr_context_is_left_alone(als: AsyncLocalStorage[str]) -> None:
    """A context set on a greenlet before it starts (SQLAlchemy, greenback) wins."""
    preset = contextvars.Context()
    preset.run(als.enter_with, "preset")
    g = Greenlet(als.get_store)
    g.gr_context = preset
    als.run("spawner", g.start)
    assert g.get(timeout=5) == "preset"


# -- row 4: link callbacks -------------------------------------------------------


@pytest.mark.parametrize("method", ["link", "link_value", "rawlink"])
def test_link_callback_sees_link_time_context(method: str, als: AsyncLocalStorage[str]) -> None:
    """Callbacks see the context current at link() time, not at spawn time."""
    results: list[Any] = []
    g = als.run("spawned", gevent.spawn, gevent.sleep, 0.001)
    als.run("linked", getattr(g, method), lambda source: results.append(als.get_store()))
    g.join()
    gevent.sleep(0.01)
    assert results == ["linked"]


def test_unlink_removes_a_wrapped_callback(als: AsyncLocalStorage[str]) -> None:
    """unlink(cb) still removes a callback linked with link() or rawlink()."""
    calls: list[str] = []

    def cb(source: Any) -> None:
        calls.append("called")

    g = gevent.spawn(gevent.sleep, 0.001)
    als.run("x", g.link, cb)
    als.run("x", g.rawlink, cb)
    assert g.has_links()
    g.unlink(cb)
    g.unlink(cb)
    assert not g.has_links()
    g.join()
    gevent.sleep(0.01)
    assert calls == []


# -- the hub is not a request ------------------------------------------------------


def test_hub_state_does_not_reach_hub_spawned_greenlets(als: AsyncLocalStorage[str]) -> None:
    """A loop callback that enter_with()s in the hub leaves nothing for greenlets
    the hub spawns later (SPEC Pitfalls)."""
    hub = gevent.get_hub()
    done = gevent.event.Event()
    seen: list[Any] = []

    def pollute() -> None:
        als.enter_with("HUB-POLLUTION")
        var.set("HUB-POLLUTION")

    def spawn_from_hub() -> None:
        g = gevent.spawn(lambda: seen.append((als.get_store(), var.get())))
        g.rawlink(lambda _: done.set())

    hub.loop.run_callback(pollute)
    gevent.sleep(0)
    hub.loop.run_callback(spawn_from_hub)
    assert done.wait(timeout=5)
    try:
        assert seen == [(None, "unset")]
    finally:
        # The hub lives on for the next test: clean what this test put in it.
        hub.loop.run_callback(als.enter_with, None)
        hub.loop.run_callback(var.set, "unset")
        gevent.sleep(0)


# -- rows 6, 9, 10: threads and asyncio ------------------------------------------


def test_executor_worker_started_in_request_a_runs_b_in_b(als: AsyncLocalStorage[str]) -> None:
    """A ThreadPoolExecutor worker started during request A runs B's task in B's
    context, and each task in its own copy (A's later writes never show)."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        def task() -> Any:
            seen = als.get_store(), var.get()
            als.enter_with("task-wrote")
            var.set("task-wrote")
            return seen

        first = als.run("A", executor.submit, task).result(timeout=5)
        second = als.run("B", executor.submit, task).result(timeout=5)
        bare = executor.submit(task).result(timeout=5)
        assert (first, second, bare) == (("A", "unset"), ("B", "unset"), (None, "unset"))
    finally:
        executor.shutdown(wait=True)


def test_real_threads_are_isolated(als: AsyncLocalStorage[str]) -> None:
    """Row 10: a real OS thread (no monkey-patching) starts empty, as in Python."""
    seen: list[Any] = []

    def start() -> None:
        t = threading.Thread(target=lambda: seen.append(als.get_store()))
        t.start()
        t.join(5)

    als.run("main-thread", start)
    assert seen == [None]


def test_asyncio_to_thread_and_run_in_executor(als: AsyncLocalStorage[str]) -> None:
    """Row 9: asyncio.to_thread and loop.run_in_executor see the task's store."""
    async def request(n: int) -> tuple[Any, Any, Any]:
        als.enter_with(f"task-{n}")
        loop = asyncio.get_running_loop()
        return (
            await asyncio.to_thread(als.get_store),
            await loop.run_in_executor(None, als.get_store),
            await loop.run_in_executor(EXECUTOR, als.get_store),
        )

    async def main() -> list[Any]:
        return list(await asyncio.gather(*(request(n) for n in range(30))))

    for n, seen in enumerate(asyncio.run(main())):
        assert seen == (f"task-{n}",) * 3


# -- install / uninstall ------------------------------------------------------------


def _gevent_attributes() -> dict[str, Any]:
    return {
        "spawn_raw": (gevent.spawn_raw, gevent.hub.spawn_raw),
        "rawlink": Greenlet.__dict__["rawlink"],
        "submit": concurrent.futures.ThreadPoolExecutor.__dict__["submit"],
        "threadpool": (gevent.threadpool.ThreadResult,
                       gevent.threadpool.ThreadPool._WorkerGreenlet.__dict__["_before_run_task"],
                       gevent.threadpool.ThreadPool._WorkerGreenlet.__dict__["_after_run_task"]),
        "linkable": gevent._abstract_linkable.AbstractLinkable.__dict__["rawlink"],
        "server": (gevent.baseserver.BaseServer.__dict__["start"],
                   gevent.baseserver.BaseServer.__dict__["do_handle"],
                   gevent.baseserver.BaseServer.__dict__["close"]),
        "pywsgi": gevent.pywsgi.WSGIHandler.__dict__["handle_one_request"],
    }


def test_uninstall_puts_gevent_back_exactly(no_hooks: None) -> None:
    """install() changes gevent; uninstall() restores every attribute, and both
    are idempotent."""
    pristine = _gevent_attributes()
    asl_gevent.install()
    asl_gevent.install()
    assert asl_gevent.is_installed()
    installed = _gevent_attributes()
    assert all(installed[k] != pristine[k] for k in pristine)
    asl_gevent.uninstall()
    asl_gevent.uninstall()
    assert not asl_gevent.is_installed()
    assert _gevent_attributes() == pristine


def test_uninstalled_hooks_are_not_reinstalled_by_new_storages(no_hooks: None) -> None:
    """install() runs by itself for the first storage only; after an explicit
    uninstall(), making another storage does not override the user."""
    AsyncLocalStorage(name="later")
    assert not asl_gevent.is_installed()


# -- monkey.patch_all (subprocesses) ----------------------------------------------


def _matrix(*args: str) -> dict[str, dict[str, Any]]:
    proc = run_python(f"import runpy, sys; sys.argv = ['matrix.py', *{list(args)!r}]; "
                      f"sys.path.insert(0, {str(ROOT / 'tests')!r}); "
                      "runpy.run_path(sys.path[0] + '/matrix.py', run_name='__main__')",
                      timeout=180)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["path"]: row for row in rows}


def test_patched_matrix() -> None:
    """After monkey.patch_all (which installs the hooks through gevent's plugin
    entry point), every path, patched threads included, carries each of 50
    concurrent requests' store to its child and only there."""
    rows = _matrix("patch", "50")
    assert set(rows) >= {*ALL_PATHS, "threading.Thread", "_thread.start_new_thread",
                         "threading.Timer"}
    for path, row in rows.items():
        assert row["installed"] is True, path
        wrong = {k: v for k, v in row["seen"].items() if k != v}
        assert len(row["seen"]) == 50 and not wrong, (path, wrong)


def test_patched_matrix_negative_control() -> None:
    """After monkey.patch_all and uninstall(), children see nothing."""
    rows = _matrix("patch", "nohooks", "5")
    assert len(rows) == len(ALL_PATHS) + 3
    for path, row in rows.items():
        assert row["installed"] is False and set(row["seen"].values()) == {None}, path


def test_patch_all_installs_hooks_through_plugin() -> None:
    """gevent's did_patch_all entry point installs the hooks without any call."""
    proc = run_scenario("plugin_install")
    assert proc.stdout.split() == ["True", "True"]


@pytest.mark.skipif(sys.version_info < (3, 14), reason="thread_inherit_context is 3.14+")
def test_executor_worker_sits_in_empty_context_with_thread_inherit_context(
        als: AsyncLocalStorage[str]) -> None:  # pragma: no cover - CI runs 3.11
    """Python 3.14 threads may inherit the starter's context; a worker started
    by request A's submit must still run B's task in B's context."""
    proc = run_python("""
        import concurrent.futures
        from asl_gevent import AsyncLocalStorage
        als = AsyncLocalStorage()
        ex = concurrent.futures.ThreadPoolExecutor(1)
        print(als.run("A", ex.submit, als.get_store).result(), ex.submit(als.get_store).result())
    """, args=(), env={"PYTHON_THREAD_INHERIT_CONTEXT": "1"})
    assert proc.stdout.split() == ["A", "None"]
