"""install()/uninstall() as machinery: import order, other patchers, reloads,
threads, a replaced ``gevent.Greenlet``, the plugin entry point and its opt-out.

Anything that touches ``patch_all``, module replacement, reloads or import
order runs in a fresh interpreter (``tests/scenarios/``); the tests assert on
what it printed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import sys
from typing import Any, Callable, Dict, Iterator, List

import gevent
import gevent.event
import gevent.hub
import pytest

import asl_gevent
import asl_gevent._hooks
from asl_gevent import AsyncLocalStorage
from helpers import SCENARIOS, run_python, run_scenario

SpawnRaw = Callable[..., Any]


def _scenario(name: str, *args: str, env: Dict[str, str] | None = None,
              timeout: float = 120) -> Dict[str, Any]:
    proc = run_python((SCENARIOS / f"{name}.py").read_text(), args=args, env=env,
                      timeout=timeout)
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- a replaced gevent.Greenlet (ddtrace < 2) --------------------------------------


@pytest.mark.parametrize("patch", ["patch", "nopatch"])
@pytest.mark.parametrize("init", ["init", "noinit"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_replaced_greenlet_class_still_propagates(when: str, init: str, patch: str) -> None:
    """A subclass assigned to gevent.Greenlet and gevent.greenlet.Greenlet,
    before or after ``import asl_gevent``, with or without its own __init__,
    with or without patch_all: the import works, no warning, and spawns
    (module, class, subclass, start()), links, rawlinks and spawn_raw in 20
    concurrent requests each see their own request's store."""
    out = _scenario("replaced_greenlet", when, init, patch)
    assert out["installed"] is True
    for n, seen in enumerate(out["seen"]):
        assert seen.pop("traced") is True  # the subclass really was used
        assert seen == dict.fromkeys(seen, f"r{n}") and len(seen) == 7, seen


# -- the plugin entry point never raises into patch_all() ------------------------


def test_plugin_that_cannot_install_warns_once_and_leaves_gevent_untouched() -> None:
    """A class we must patch refuses it: patch_all() still returns, one
    RuntimeWarning names why, every attribute patched before the failure is
    rolled back, the import finder is gone, and a first storage made later
    neither installs a half set of hooks nor warns again."""
    out = _scenario("plugin_failure")
    assert out["warnings"] == [
        "RuntimeWarning: asl_gevent: could not install its hooks (RuntimeError: "
        "FrozenExecutor is frozen); gevent is left as it was; stores will not follow "
        "spawned greenlets. Set ASL_GEVENT_AUTO_INSTALL=0 to silence this."]
    assert out["untouched"] is True and out["installed"] is False
    assert out["finder_left"] is False
    assert out["seen"] is None  # no hooks: the spawned greenlet starts empty


# -- ASL_GEVENT_AUTO_INSTALL=0 ------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_auto_install_env_var_off_stops_plugin_and_first_storage(value: str) -> None:
    """ASL_GEVENT_AUTO_INSTALL=0: neither patch_all's plugin nor the first
    storage installs the hooks; an explicit install() still does."""
    proc = run_scenario("auto_install", env={"ASL_GEVENT_AUTO_INSTALL": value})
    assert proc.stdout.split() == ["False", "False", "True", "x"]


def test_auto_install_env_var_on_or_unset_installs() -> None:
    """Control: with the variable unset or 1, patch_all installs the hooks."""
    for env in ({}, {"ASL_GEVENT_AUTO_INSTALL": "1"}):
        proc = run_scenario("auto_install", env=env)
        assert proc.stdout.split() == ["True", "True", "True", "x"], env


def test_patch_all_does_not_reinstall_after_an_explicit_uninstall() -> None:
    """Defect 9: like a new storage, patch_all's plugin leaves the hooks out
    after an explicit uninstall() (the spawned greenlet starts empty); an
    explicit install() still puts them in. (Without the uninstall,
    test_auto_install_env_var_on_or_unset_installs shows patch_all installs.)"""
    proc = run_scenario("uninstall_then_patch")
    assert proc.stdout.split() == ["True", "False", "False", "None", "True", "r1"]


# -- import cost: modules are hooked when they are imported -------------------------


def test_import_asl_gevent_imports_no_hooked_module() -> None:
    """``import asl_gevent`` (and install()) leave gevent.pywsgi,
    gevent.threadpool, concurrent.futures, the servers, http.client, email,
    logging and ctypes unimported; those are hooked when the program imports
    them, and every path then carries the store (StreamServer handlers,
    pywsgi keep-alive isolation, ThreadPool, the hub's threadpool,
    ThreadPoolExecutor)."""
    out = _scenario("import_order", "install")
    assert out["imported_by_asl_gevent"] == []
    assert out["installed"] is True
    _assert_paths_hooked(out["seen"])


def test_modules_imported_after_patch_all_are_hooked() -> None:
    """Same, with the hooks installed by patch_all's plugin first."""
    out = _scenario("import_order", "patch")
    assert out["installed"] is True
    _assert_paths_hooked(out["seen"])


def test_modules_imported_after_uninstall_are_not_hooked() -> None:
    """Negative control: uninstall() before the imports: nothing is hooked."""
    out = _scenario("import_order", "install", "nohooks")
    seen = out["seen"]
    assert out["installed"] is False
    assert seen["StreamServer handler"] == [None] * 3
    assert seen["pywsgi keep-alive request 2"] == "/one"  # request 1 leaked
    assert not any(seen["ThreadPool.spawn"] + seen["ThreadPoolExecutor.submit"]
                   + seen["hub threadpool"])


def _assert_paths_hooked(seen: Dict[str, Any]) -> None:
    assert seen["StreamServer handler"] == ["server-start"] * 3
    assert seen["pywsgi keep-alive request 2"] is None
    for path in ("ThreadPool.spawn", "ThreadPoolExecutor.submit", "hub threadpool"):
        assert seen[path] == [True] * 10, path


@pytest.mark.parametrize("mode", [["install"], ["patch"]], ids=["install", "patch_all"])
def test_matrix_with_every_module_imported_after_the_hooks(mode: List[str]) -> None:
    """The whole path matrix, with tests/matrix.py (and so concurrent.futures,
    gevent.pool, gevent.threadpool) imported only after install() or after
    patch_all's plugin installed the hooks: 20 concurrent requests per path,
    each child sees its own request's store."""
    from helpers import ROOT

    proc = run_python(f"""
        import sys
        if {mode!r} == ["install"]:
            import asl_gevent
            asl_gevent.install()
            assert "concurrent.futures" not in sys.modules
        sys.argv = ["matrix.py", *{mode!r}[1:], *(["patch"] if {mode!r} == ["patch"] else [])]
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import runpy
        runpy.run_path(sys.path[0] + "/matrix.py", run_name="__main__")
    """, timeout=180)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 25
    for row in rows:
        wrong = {k: v for k, v in row["seen"].items() if k != v}
        assert row["installed"] is True and len(row["seen"]) == 20 and not wrong, row["path"]


# -- importlib.reload ---------------------------------------------------------------


@pytest.mark.parametrize("modules", [
    ["asl_gevent._hooks"],
    ["asl_gevent._hooks", "asl_gevent._hooks"],
    ["asl_gevent", "asl_gevent._storage", "asl_gevent._context", "asl_gevent._resource",
     "asl_gevent.wsgi", "asl_gevent._hooks"],
    ["asl_gevent._paths", "asl_gevent._imports", "asl_gevent._detach", "asl_gevent._hooks"],
], ids=["hooks", "hooks-twice", "every-module", "paths-imports-detach"])
def test_reload_while_installed_keeps_hooks_working_and_removable(modules: List[str]) -> None:
    """Reloading asl_gevent modules while installed: no hook calls itself
    (spawn, link, spawn_raw, executor, ThreadPool, StreamServer all still
    carry the store), is_installed() still says True, and uninstall() puts
    every attribute back exactly."""
    out = _scenario("reload", *modules)
    assert out["seen"] == {"spawn": "request", "link": "request", "submit": "request",
                           "threadpool": "request", "spawn_raw": "request",
                           "server": ["started"]}
    assert out["installed"] is True and out["uninstalled"] is True
    assert out["pristine"] is True


@pytest.mark.parametrize("modules", [
    ["asl_gevent.http"], ["asl_gevent._detach"], ["asl_gevent._storage"],
    ["asl_gevent._storage", "asl_gevent._detach", "asl_gevent.http", "asl_gevent._detach"],
], ids=["http", "detach", "storage", "all"])
def test_reload_of_stateful_modules_keeps_their_state(modules: List[str]) -> None:
    """Defect 8: reloading asl_gevent.http, _detach or _storage while
    installed keeps their state: http.is_installed() stays true and
    uninstall() restores urllib3 exactly; the detach companion is registered
    once (so uninstall() unmarks QueueListener.start, also after a second
    install), a detached() block entered before the reload still works and
    exits; named storages made before are still found."""
    out = _scenario("reload_state", *modules)
    assert out == {"in_block": None, "after_block": "r1", "http_installed": True,
                   "companions": 0, "named": True, "marked": True,
                   "http_restored": [True, False], "starter_restored": True,
                   "starter_restored_again": True}


# -- threads ------------------------------------------------------------------------


def test_install_and_uninstall_race_from_real_threads() -> None:
    """Two OS threads making their first storage at once both return with
    every hook in place; threads calling install()/uninstall() at random
    leave gevent fully hooked or exactly as it was, as is_installed() says
    (300 rounds, switch interval 1 us, bounded joins)."""
    out = _scenario("install_race", "300")
    assert out["count"] == 0, out["problems"]


# -- other patchers compose ---------------------------------------------------------


# ``gevent.spawn_raw`` (and ``gevent.hub.spawn_raw``, the same function) is
# the attribute other patchers wrap here: its hook alone carries the store.
# (ThreadPoolExecutor.submit is no longer hooked: the executor's context
# travels on its work items.)


def _set_spawn_raw(value: SpawnRaw) -> None:
    gevent.spawn_raw = gevent.hub.spawn_raw = value


def _current_spawn_raw() -> SpawnRaw:
    current: SpawnRaw = vars(gevent.hub)["spawn_raw"]
    assert vars(gevent)["spawn_raw"] is current
    return current


@pytest.fixture(name="pristine_spawn_raw")
def _pristine_spawn_raw(no_hooks: None) -> Iterator[SpawnRaw]:
    """gevent.spawn_raw as it was; put back whatever a test did."""
    original = _current_spawn_raw()
    try:
        yield original
    finally:
        asl_gevent.uninstall()
        _set_spawn_raw(original)


def _counting(spawn_raw: SpawnRaw, calls: List[str], name: str) -> SpawnRaw:
    @functools.wraps(spawn_raw)
    def instrumented(function: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return spawn_raw(function, *args, **kwargs)

    return instrumented


def _spawned_store(als: AsyncLocalStorage[str]) -> Any:
    """What a greenlet started with gevent.spawn_raw in request "request" sees."""
    box: List[Any] = []
    done = gevent.event.Event()

    def request() -> None:
        gevent.spawn_raw(lambda: (box.append(als.get_store()), done.set()))
        assert done.wait(5)

    als.run("request", request)
    return box[0]


def test_wrapper_set_before_install_keeps_being_called(
        pristine_spawn_raw: SpawnRaw, als: AsyncLocalStorage[str]) -> None:
    """An instrumentation that wrapped gevent.spawn_raw before install() is
    still called while installed (the hook wraps it), the greenlet sees its
    spawner's store, and uninstall() gives back the wrapper."""
    calls: List[str] = []
    wrapper = _counting(pristine_spawn_raw, calls, "before")
    _set_spawn_raw(wrapper)
    asl_gevent.install()
    assert _spawned_store(als) == "request"
    assert calls == ["before"]
    asl_gevent.uninstall()
    assert _current_spawn_raw() is wrapper
    assert _spawned_store(als) is None and calls == ["before", "before"]


def test_wrapper_set_after_install_survives_uninstall(
        pristine_spawn_raw: SpawnRaw, als: AsyncLocalStorage[str]) -> None:
    """A wrapper set over our hook after install() is not removed by
    uninstall() (it keeps calling our hook, which keeps working)."""
    calls: List[str] = []
    asl_gevent.install()
    wrapper = _counting(_current_spawn_raw(), calls, "after")
    _set_spawn_raw(wrapper)
    asl_gevent.uninstall()
    assert not asl_gevent.is_installed()
    assert _current_spawn_raw() is wrapper
    assert _spawned_store(als) == "request" and calls == ["after"]


def test_uninstall_does_not_resurrect_what_was_replaced_after_install(
        pristine_spawn_raw: SpawnRaw) -> None:
    """Someone replaced our hook outright after install(): uninstall() leaves
    their replacement, and does not put back the original it displaced;
    the other attributes are restored."""
    asl_gevent.install()
    replacement = _counting(pristine_spawn_raw, [], "replacement")
    _set_spawn_raw(replacement)
    asl_gevent.uninstall()
    assert _current_spawn_raw() is replacement
    assert vars(asl_gevent._hooks.Greenlet)["rawlink"].__module__ != "asl_gevent._paths"


def test_reinstall_after_a_wrapper_over_our_hook_was_removed(
        pristine_spawn_raw: SpawnRaw, als: AsyncLocalStorage[str]) -> None:
    """Defect 10, as the README now says: a wrapper over our hook that is
    later unwrapped puts our hook back, which keeps carrying the store
    although is_installed() is False; the next install() recognises it and
    wraps the true original once, and uninstall() then restores that
    original (the greenlet starts empty again)."""
    asl_gevent.install()
    ours = _current_spawn_raw()
    _set_spawn_raw(_counting(ours, [], "temporary"))
    asl_gevent.uninstall()
    _set_spawn_raw(ours)  # the wrapper is removed
    assert not asl_gevent.is_installed() and _spawned_store(als) == "request"
    asl_gevent.install()
    assert _current_spawn_raw() is ours
    assert ours.__wrapped__ is pristine_spawn_raw  # type: ignore[attr-defined]
    assert _spawned_store(als) == "request"
    asl_gevent.uninstall()
    assert _current_spawn_raw() is pristine_spawn_raw
    assert _spawned_store(als) is None


def test_fork_while_another_thread_holds_the_install_lock() -> None:
    """A child forked while another thread is inside install()/uninstall()
    (holding the lock) can still install: it starts with a free lock."""
    proc = run_python("""
        import os, threading, time
        import asl_gevent, asl_gevent._hooks as hooks
        asl_gevent.uninstall()
        held, release = threading.Event(), threading.Event()
        def hold():
            with hooks._state.lock:
                held.set()
                release.wait(10)
        thread = threading.Thread(target=hold)
        thread.start()
        held.wait(5)
        pid = os.fork()
        if pid == 0:
            asl_gevent.install()
            os._exit(0 if asl_gevent.is_installed() else 1)
        release.set()
        thread.join(5)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("child hung")
        else:
            print("child exit", os.waitstatus_to_exitcode(done[1]))
    """)
    assert proc.stdout.split() == ["child", "exit", "0"]


@pytest.mark.parametrize("wraps", [True, False], ids=["functools.wraps", "plain-closure"])
def test_reinstall_over_a_wrapper_of_our_hook_never_recurses(
        pristine_spawn_raw: SpawnRaw, als: AsyncLocalStorage[str], wraps: bool) -> None:
    """install(); a library wraps our hook; uninstall() leaves its wrapper;
    install() again must not wrap that wrapper (which calls our hook, which
    would then call the wrapper again: a RecursionError). The path stays
    hooked through the wrapper; uninstall() leaves it again."""
    calls: List[str] = []
    asl_gevent.install()
    ours = _current_spawn_raw()

    def plain(function: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append("plain")
        return ours(function, *args, **kwargs)

    wrapper = _counting(ours, calls, "wraps") if wraps else plain
    _set_spawn_raw(wrapper)
    for _ in range(3):
        asl_gevent.uninstall()
        asl_gevent.install()
        assert _current_spawn_raw() is wrapper
        assert _spawned_store(als) == "request"
    asl_gevent.uninstall()
    assert _current_spawn_raw() is wrapper and len(calls) == 3


def test_reimported_hooks_module_shares_the_installed_state() -> None:
    """``del sys.modules["asl_gevent._hooks"]`` and import it again while
    installed: the new copy finds the state through the installed hooks
    (is_installed() is true), its uninstall() removes the old copy's hooks and
    spawn callback (gevent pristine, a spawned greenlet starts empty, the old
    copy agrees), and its install() works without any hook calling itself."""
    out = _scenario("reimport")
    assert out == {"fresh": True, "sees_installed": True, "pristine": True,
                   "after_uninstall": None, "old_module_agrees": True,
                   "after_install": ["request", ["request"]]}
