"""Detached work (issue 9): long-lived work started with no request context.

``run_detached``, ``with detached():`` and ``detach_starter`` start work in an
empty context; the known library workers (sentry-sdk, OpenTelemetry's batch
span processor and periodic metric reader, logging's QueueListener) start
detached by themselves; work a request starts on purpose keeps its store.
The library scenario runs monkey-patched in a subprocess
(``tests/scenarios/workers_patched.py``), once as is and once with the known
workers left attached (negative control).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import gevent
import gevent.pool
import pytest
from gevent.greenlet import Greenlet

import asl_gevent
from asl_gevent import (KNOWN_STARTERS, AsyncLocalStorage, detach_starter, detached,
                        run_detached, undetach_starter)
from asl_gevent import _detach, _hooks
from asl_gevent import _paths as hook_paths
from helpers import SCENARIOS, run_python


def _scenario(**env: str) -> Dict[str, Any]:
    proc = run_python((SCENARIOS / "workers_patched.py").read_text(), env=env, timeout=120)
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- the libraries, monkey-patched -------------------------------------------


@pytest.fixture(scope="module", name="scenario")
def _scenario_default() -> Dict[str, Any]:
    return _scenario()


@pytest.fixture(scope="module", name="attached")
def _scenario_attached() -> Dict[str, Any]:
    return _scenario(ASL_GEVENT_DETACH_KNOWN="0")


def test_sentry_sends_run_in_no_request(scenario: Dict[str, Any]) -> None:
    """sentry-sdk's sender thread, started lazily inside r1, sends every event
    (12, one per request) in no request's context, and none of its urllib3
    spans (OpenTelemetry instrumentation) lands in a request's trace."""
    assert scenario["installed"] is True
    assert scenario["events_received"] == 12
    assert scenario["send_contexts"] == [None] * 12
    assert len(scenario["send_spans"]) == 12
    for span in scenario["send_spans"]:
        assert span["parent"] is None and not span["in_request_trace"], span


def test_r1_store_is_collected(scenario: Dict[str, Any]) -> None:
    """r1 started every library worker, yet its store is freed after r1 ends,
    and the leak watch (on, 0.3 s) has nothing to say."""
    assert scenario["r1_collected"] is True
    assert scenario["leaks"] == []


def test_queue_listener_and_otel_workers_run_in_no_request(scenario: Dict[str, Any]) -> None:
    """A QueueListener started lazily by its handler in r1, a BatchSpanProcessor
    and a PeriodicExportingMetricReader created in r1: their threads handle
    every record/batch in an empty context."""
    workers = scenario["worker_contexts"]
    assert len(workers["queue_listener"]) == 12
    assert workers["batch_span_processor"] and workers["metric_reader"]
    for name, seen in workers.items():
        assert set(seen) == {None}, (name, seen)


def test_fire_and_forget_work_keeps_its_request(scenario: Dict[str, Any]) -> None:
    """A thread and a greenlet a request starts on purpose see that request's
    id (each of 12 requests, patched); a thread started in ``with
    detached():`` sees none."""
    audits = scenario["audits"]
    assert len(audits) == 24
    assert all(expected == seen for _, expected, seen in audits), audits
    assert sorted(kind for kind, _, _ in audits) == ["greenlet"] * 12 + ["thread"] * 12
    assert scenario["detached_audits"] == [None] * 12


def test_negative_control_known_workers_attached(attached: Dict[str, Any]) -> None:
    """ASL_GEVENT_DETACH_KNOWN=0: the issue's bug is back (every send runs in
    r1's context and traces into r1, r1's store is never freed), and the leak
    watch names each worker thread, once, with r1's id."""
    assert attached["send_contexts"] == ["r1"] * 12
    assert all(span["parent_is_request"] for span in attached["send_spans"])
    assert attached["r1_collected"] is False
    assert "r1" in attached["worker_contexts"]["queue_listener"]
    assert "r1" in attached["worker_contexts"]["batch_span_processor"]
    leaks = attached["leaks"]
    holders = sorted(line.split("held by thread ")[1].split(" running")[0] for line in leaks)
    # OTel <= 1.33 names its batch thread OtelBatchSpanProcessor.
    holders = ["'OtelBatchSpanRecordProcessor'" if h == "'OtelBatchSpanProcessor'" else h
               for h in holders]
    assert holders == ["'OtelBatchSpanRecordProcessor'", "'OtelPeriodicExportingMetricReader'",
                       "'Thread-2 (_monitor)'", "'sentry-sdk.BackgroundWorker'"], leaks
    assert all(line.startswith("request r1 ended ") for line in leaks), leaks
    sentry = next(line for line in leaks if "sentry-sdk.BackgroundWorker" in line)
    assert "running sentry_sdk.worker.BackgroundWorker._target" in sentry
    assert "sentry_sdk/worker.py" in sentry  # where it was started
    assert "holds request={'request_id': 'r1'}" in sentry


# -- run_detached -------------------------------------------------------------


def test_run_detached_runs_in_an_empty_context(als: AsyncLocalStorage[str]) -> None:
    """The function and what it starts see no store; the caller keeps its own."""
    other = AsyncLocalStorage[str](name="other")

    def handler() -> List[Optional[str]]:
        other.enter_with("o")
        inside = run_detached(lambda: [als.get_store(), other.get_store(),
                                       gevent.spawn(als.get_store).get()])
        return [*inside, als.get_store(), other.get_store()]

    assert als.run("r1", handler) == [None, None, None, "r1", "o"]


def test_run_detached_passes_arguments_and_result() -> None:
    assert run_detached(lambda a, *, b: a + b, 1, b=2) == 3


def test_run_detached_bad_input(als: AsyncLocalStorage[str]) -> None:
    def call() -> None:
        with pytest.raises(TypeError, match=r"^run_detached\(\) argument 'fn' must be callable, not 'int'"):
            run_detached(42)  # type: ignore[arg-type]
        assert als.get_store() == "kept"

    als.run("kept", call)


# -- with detached(): ---------------------------------------------------------


def _paths() -> Dict[str, Any]:
    pool = gevent.pool.Pool(4)

    def raw(als: AsyncLocalStorage[str]) -> Any:
        seen: List[Optional[str]] = []
        gevent.spawn_raw(lambda: seen.append(als.get_store()))
        return lambda: (gevent.sleep(0.01), seen[0])[1]

    return {
        "spawn": lambda als: gevent.spawn(als.get_store).get,
        "spawn_later": lambda als: gevent.spawn_later(0, als.get_store).get,
        "pool": lambda als: pool.spawn(als.get_store).get,
        "subclass": lambda als: type("Sub", (Greenlet,), {})(als.get_store).__class__.spawn(als.get_store).get,
        "spawn_raw": raw,
    }


@pytest.mark.parametrize("path", sorted(_paths()))
def test_detached_block_starts_work_empty(path: str, als: AsyncLocalStorage[str]) -> None:
    """Inside the block, the block's code keeps its store; work it starts on
    each spawn path starts empty; after the block, spawns carry it again."""
    start = _paths()[path]

    def handler() -> List[Optional[str]]:
        with detached():
            inside = start(als)
            here = als.get_store()
        after = start(als)
        return [inside(), here, after()]

    assert als.run("r1", handler) == [None, "r1", "r1"]


def test_detached_block_is_per_greenlet(als: AsyncLocalStorage[str]) -> None:
    """While one request sits in a detached() block, 50 concurrent requests'
    fire-and-forget greenlets and executor tasks still carry their own id."""
    entered = gevent.event.Event()
    release = gevent.event.Event()

    def library() -> None:
        with detached():
            entered.set()
            release.wait(10)

    executor = ThreadPoolExecutor(max_workers=4)
    seen: Dict[str, List[Optional[str]]] = {}

    def request(n: int) -> None:
        own = f"r{n}"
        seen[own] = [gevent.spawn(als.get_store).get(),
                     executor.submit(als.get_store).result(10)]

    holder = gevent.spawn(als.run, "lib", library)
    entered.wait(10)
    try:
        gevent.joinall([gevent.spawn(als.run, f"r{n}", request, n) for n in range(50)],
                       timeout=30, raise_error=True)
    finally:
        release.set()
        holder.join(10)
        executor.shutdown()
    assert seen == {f"r{n}": [f"r{n}", f"r{n}"] for n in range(50)}


def test_detached_block_ends_with_the_block(als: AsyncLocalStorage[str]) -> None:
    """A function bound inside the block and called after it (while another
    block is active elsewhere) spawns attached again: the flag is the block."""
    def handler() -> Optional[str]:
        with detached():
            bound = AsyncLocalStorage.bind(lambda: gevent.spawn(als.get_store).get())
        with detached():  # keeps the spawn callback registered
            return gevent.spawn(bound).get()

    assert als.run("r1", handler) == "r1"


def test_detached_block_costs_nothing_when_inactive() -> None:
    """Its check is set only while some block is active (blocks nest)."""
    def registered() -> bool:
        return _detach._active_blocks > 0 and hook_paths._detaching_check is not None

    assert not registered()
    with detached():
        with detached():
            assert registered()
        assert registered()
    assert not registered()
    assert hook_paths._detaching_check is None


def test_detached_block_leaves_a_preset_context_alone(als: AsyncLocalStorage[str]) -> None:
    """Defect 6 (SPEC: a context set on a greenlet before it starts is left
    alone): inside the block too, while a plain spawn there starts empty."""
    def handler() -> Any:
        with detached():
            preset = Greenlet(als.get_store)
            preset.gr_context = contextvars.copy_context()
            preset.start()
            explicit = contextvars.Context()
            explicit.run(als.enter_with, "explicit")
            other = Greenlet(als.get_store)
            other.gr_context = explicit
            other.start()
            raw: list[Any] = []
            gevent.spawn_raw(lambda: raw.append(als.get_store()))
            plain = gevent.spawn(als.get_store)
            gevent.sleep(0)
        return preset.get(), other.get(), plain.get(), raw

    assert als.run("r1", handler) == ("r1", "explicit", None, [None])


def test_detached_block_misuse() -> None:
    """Entered twice, exited twice or in another greenlet: a clear RuntimeError,
    and the callback count stays right."""
    block = detached()
    with block:
        with pytest.raises(RuntimeError, match=r"^this detached\(\) block was already entered"):
            block.__enter__()
    with pytest.raises(RuntimeError, match=r"^this detached\(\) block was already exited"):
        block.__exit__(None, None, None)
    other = detached()
    other.__enter__()
    error = gevent.spawn(lambda: pytest.raises(RuntimeError, other.__exit__, None, None, None)).get()
    assert "another greenlet" in str(error.value)
    other.__exit__(None, None, None)
    assert _detach._active_blocks == 0


def test_detached_block_without_hooks(no_hooks: None, als: AsyncLocalStorage[str]) -> None:
    """With the hooks off a greenlet starts empty anyway; the block still works."""
    def handler() -> Optional[str]:
        with detached():
            return gevent.spawn(als.get_store).get()

    assert als.run("r1", handler) is None


# -- detach_starter -------------------------------------------------------------


class _Library:
    """A library that starts its worker thread lazily, on first use."""

    def __init__(self, als: AsyncLocalStorage[str]) -> None:
        self.als = als
        self.seen: List[Optional[str]] = []
        self.worker: Optional[gevent.Greenlet] = None

    def submit(self) -> None:
        if self.worker is None:
            self.start()

    def start(self) -> None:
        self.worker = gevent.spawn(lambda: self.seen.append(self.als.get_store()))

    @staticmethod
    def static_start(als: AsyncLocalStorage[str]) -> Any:
        return gevent.spawn(als.get_store)


def test_detach_starter_on_an_imported_module(als: AsyncLocalStorage[str]) -> None:
    """A marked method runs detached; undetach_starter puts the original back."""
    target = f"{__name__}:_Library.start"
    original = vars(_Library)["start"]
    assert detach_starter(target) is True
    try:
        assert detach_starter(target) is True  # idempotent
        library = _Library(als)
        als.run("r1", library.submit)
        library.worker.join()  # type: ignore[union-attr]
        assert library.seen == [None]
        assert detach_starter(f"{__name__}:_Library.static_start") is True
        assert als.run("r1", _Library.static_start, als).get() is None
    finally:
        undetach_starter(target)
        undetach_starter(f"{__name__}:_Library.static_start")
    assert vars(_Library)["start"] is original
    library = _Library(als)
    als.run("r1", library.submit)
    library.worker.join()  # type: ignore[union-attr]
    assert library.seen == ["r1"]  # negative control: attached again


def test_detach_starter_before_import(tmp_path: Path, als: AsyncLocalStorage[str]) -> None:
    """A module not imported yet is not imported by marking it; it is patched
    right after its own import, and its loader is the real one afterwards."""
    (tmp_path / "lazy_lib_9.py").write_text(
        "import gevent\n"
        "def start(fn):\n"
        "    return gevent.spawn(fn)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert detach_starter("lazy_lib_9:start") is False
        assert "lazy_lib_9" not in sys.modules
        import lazy_lib_9  # type: ignore[import-not-found]

        assert type(lazy_lib_9.__loader__).__name__ == "SourceFileLoader"
        assert als.run("r1", lazy_lib_9.start, als.get_store).get() is None
        undetach_starter("lazy_lib_9:start")
        assert als.run("r1", lazy_lib_9.start, als.get_store).get() == "r1"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lazy_lib_9", None)


@pytest.mark.parametrize("target, error, message", [
    (42, TypeError, r"^detach_starter\(\) argument 'target' must be a str 'module:qualname', not 'int'"),
    ("logging.handlers.QueueListener.start", ValueError,
     r"^detach_starter\(\) argument 'target' must look like 'module:qualname'"),
    ("mod:not a name", ValueError, r"^detach_starter\(\) argument 'target' must look like"),
])
def test_detach_starter_bad_input(target: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        detach_starter(target)


class _Base:
    def start(self) -> None:
        pass


class _Derived(_Base):
    pass


@pytest.mark.parametrize("target, error, message", [
    ("logging:no_such_fn", AttributeError,
     r"^detach_starter\(\) argument 'target' 'logging:no_such_fn': module 'logging' has no "
     r"attribute 'no_such_fn'$"),
    ("logging:NoSuchClass.start", AttributeError,
     r"'logging:NoSuchClass.start': module 'logging' has no 'NoSuchClass'$"),
    ("logging:DEBUG", TypeError,
     r"^detach_starter\(\) argument 'target' 'logging:DEBUG' must name a function or method, "
     r"not 'int' \(10\)$"),
    (f"{__name__}:_Derived.start", AttributeError, r"'start' is inherited by .*_Derived"),
])
def test_detach_starter_bad_target_in_an_imported_module(target: str, error: type,
                                                          message: str) -> None:
    """Defects 4 and 11: a typo or a non-function is an error at the call,
    naming the argument and the target (it used to return False, like "not
    imported yet", or raise "10 is not callable"); nothing is marked."""
    import logging

    before = dict(vars(logging)), dict(_detach._marked)
    with pytest.raises(error, match=message):
        detach_starter(target)
    assert (dict(vars(logging)), dict(_detach._marked)) == before
    assert "start" not in vars(_Derived)


def test_detach_starter_bad_lazy_target_never_breaks_the_import(tmp_path: Path) -> None:
    """Defect 4: marked before its module is imported, a name that turns out
    not to be a function (or missing) is skipped with one warning each; the
    user's import goes on and the module is untouched."""
    (tmp_path / "lazy_bad_9.py").write_text("VALUE = 1\ndef start():\n    return 'ok'\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert detach_starter("lazy_bad_9:VALUE") is False
        assert detach_starter("lazy_bad_9:missing") is False
        assert detach_starter("lazy_bad_9:start") is False
        with pytest.warns(RuntimeWarning) as warned:
            import lazy_bad_9  # type: ignore[import-not-found]
        messages = sorted(str(w.message) for w in warned)
        assert len(messages) == 2
        assert "'lazy_bad_9:VALUE' must name a function or method, not 'int'" in messages[0]
        assert "'lazy_bad_9:missing': module 'lazy_bad_9' has no attribute 'missing'" in messages[1]
        assert lazy_bad_9.VALUE == 1 and not hasattr(lazy_bad_9, "missing")
        assert getattr(lazy_bad_9.start, "__asl_gevent_detached__", False)
    finally:
        undetach_starter("lazy_bad_9:start")
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lazy_bad_9", None)


def test_missing_known_starters_are_skipped_silently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A known starter the installed version lacks is no error and no warning,
    whether its module is imported already or later."""
    (tmp_path / "lazy_known_9.py").write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    known = (*KNOWN_STARTERS, "logging:no_such_starter", "lazy_known_9:gone")
    monkeypatch.setattr(_detach, "KNOWN_STARTERS", known)
    try:
        asl_gevent.uninstall()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            asl_gevent.install()
            import lazy_known_9  # type: ignore[import-not-found]  # noqa: F401
        assert asl_gevent.is_installed()
    finally:
        asl_gevent.uninstall()
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lazy_known_9", None)


async def _async_starter(als: AsyncLocalStorage[str], seen: List[Optional[str]]) -> None:
    """A library's lazy ``async def`` starter: its task lives on."""
    async def worker() -> None:
        seen.append(als.get_store())

    await asyncio.get_running_loop().create_task(worker())


def test_detach_starter_detaches_an_async_starter(als: AsyncLocalStorage[str]) -> None:
    """Defect 7: the coroutine a marked ``async def`` starter returns runs
    detached when awaited, and so does the task it creates; unmarked (the
    negative control) it sees the request's store."""
    seen: List[Optional[str]] = []

    async def request() -> None:
        als.enter_with("r1")
        await _async_starter(als, seen)

    target = f"{__name__}:_async_starter"
    assert detach_starter(target) is True
    try:
        asyncio.run(request())
    finally:
        undetach_starter(target)
    asyncio.run(request())
    assert seen == [None, "r1"]


# -- the known starters ----------------------------------------------------------


def test_known_starters_follow_install() -> None:
    """install() marks the known starters of imported modules; uninstall()
    puts the originals back; undetach_starter keeps one off for good."""
    import logging.handlers

    start = "logging.handlers:QueueListener.start"
    assert start in KNOWN_STARTERS
    assert getattr(logging.handlers.QueueListener.start, "__asl_gevent_detached__", False)
    asl_gevent.uninstall()
    assert not hasattr(logging.handlers.QueueListener.start, "__asl_gevent_detached__")
    asl_gevent.install()
    assert getattr(logging.handlers.QueueListener.start, "__asl_gevent_detached__", False)
    undetach_starter(start)
    try:
        asl_gevent.uninstall()
        asl_gevent.install()
        assert not hasattr(logging.handlers.QueueListener.start, "__asl_gevent_detached__")
    finally:
        detach_starter(start)


def test_known_starters_import_nothing() -> None:
    """Installing imports none of the libraries; importing one later marks it."""
    proc = run_python("""
        import sys, asl_gevent
        asl_gevent.install()
        print(sorted(m for m in sys.modules if m.startswith(("sentry_sdk", "opentelemetry"))))
        import sentry_sdk.worker
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        print(getattr(sentry_sdk.worker.BackgroundWorker.start, "__asl_gevent_detached__", False),
              getattr(BatchSpanProcessor.__init__, "__asl_gevent_detached__", False))
    """)
    assert proc.stdout.split("\n")[:2] == ["[]", "True True"]


def test_known_starters_name_the_installed_workers() -> None:
    """The starter of each library's main worker exists in the installed
    versions (entries for other versions, such as OTel <= 1.33's own
    BatchSpanProcessor thread, may be missing and are skipped)."""
    import importlib

    def exists(target: str) -> bool:
        module_name, qualname = target.split(":")
        owner: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            owner = getattr(owner, part, None)
        return owner is not None

    assert exists("sentry_sdk.worker:BackgroundWorker.start")
    assert exists("logging.handlers:QueueListener.start")
    assert exists("opentelemetry.sdk.metrics._internal.export:PeriodicExportingMetricReader.__init__")
    assert exists("opentelemetry.sdk.trace.export:BatchSpanProcessor.__init__")
    assert all(target in KNOWN_STARTERS for target in (
        "sentry_sdk.worker:BackgroundWorker.start", "logging.handlers:QueueListener.start"))


def test_unpatched_fire_and_forget_keeps_the_request(als: AsyncLocalStorage[str]) -> None:
    """Without monkey-patching: a greenlet, an executor task and a gevent
    ThreadPool task started on purpose carry the request; a raw OS thread is
    empty (Python's rule before 3.14), as it was before detached work existed."""
    executor = ThreadPoolExecutor(max_workers=2)
    threadpool = gevent.get_hub().threadpool
    seen: List[Optional[str]] = []

    def handler() -> List[Optional[str]]:
        thread = threading.Thread(target=lambda: seen.append(als.get_store()))
        thread.start()
        thread.join(10)
        return [gevent.spawn(als.get_store).get(),
                executor.submit(als.get_store).result(10),
                threadpool.apply(als.get_store),
                *seen]

    try:
        expected_thread = "r1" if getattr(sys.flags, "thread_inherit_context", 0) else None
        assert als.run("r1", handler) == ["r1", "r1", "r1", expected_thread]
    finally:
        executor.shutdown()


@pytest.fixture(autouse=True)
def _no_block_left() -> Iterator[None]:
    yield
    assert _detach._active_blocks == 0


# -- importlib.reload of a marked module (issue 16, point 7) --------------------


def test_detach_starter_survives_reload(tmp_path: Path, als: AsyncLocalStorage[str]) -> None:
    """A reloaded module rebinds its starter (and its classes) to fresh,
    unmarked objects; the marks are put on them again, for a function and a
    method, marked before or after the first import; undetach_starter()
    then puts back the reloaded originals."""
    import importlib

    (tmp_path / "reload_lib_16.py").write_text(
        "import gevent\n"
        "def start(fn):\n"
        "    return gevent.spawn(fn)\n"
        "class Reaper:\n"
        "    def start(self, fn):\n"
        "        return gevent.spawn(fn)\n")
    (tmp_path / "reload_lazy_16.py").write_text(
        "import gevent\n"
        "def start(fn):\n"
        "    return gevent.spawn(fn)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import reload_lib_16  # type: ignore[import-not-found]

        assert detach_starter("reload_lib_16:start") is True
        assert detach_starter("reload_lib_16:Reaper.start") is True
        assert detach_starter("reload_lazy_16:start") is False
        import reload_lazy_16  # type: ignore[import-not-found]

        for _ in range(2):  # a second reload as well
            old_class = reload_lib_16.Reaper
            importlib.reload(reload_lib_16)
            importlib.reload(reload_lazy_16)
            assert reload_lib_16.Reaper is not old_class  # really fresh objects
            assert als.run("r1", reload_lib_16.start, als.get_store).get() is None
            assert als.run("r1", reload_lib_16.Reaper().start, als.get_store).get() is None
            assert als.run("r1", old_class().start, als.get_store).get() is None
            assert als.run("r1", reload_lazy_16.start, als.get_store).get() is None
        fresh = reload_lib_16.start
        undetach_starter("reload_lib_16:start")
        undetach_starter("reload_lib_16:Reaper.start")
        undetach_starter("reload_lazy_16:start")
        assert reload_lib_16.start is not fresh  # the reloaded original is back
        assert als.run("r1", reload_lib_16.start, als.get_store).get() == "r1"
        assert als.run("r1", reload_lib_16.Reaper().start, als.get_store).get() == "r1"
        assert als.run("r1", reload_lazy_16.start, als.get_store).get() == "r1"
        importlib.reload(reload_lib_16)  # unmarked: stays unmarked
        assert als.run("r1", reload_lib_16.start, als.get_store).get() == "r1"
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("reload_lib_16", "reload_lazy_16"):
            sys.modules.pop(name, None)
            for target in (f"{name}:start", f"{name}:Reaper.start"):
                undetach_starter(target)


def test_reload_of_a_marked_module_drops_a_vanished_starter(tmp_path: Path) -> None:
    """A reload that removes a marked starter never breaks the reload: one
    RuntimeWarning, and the mark is dropped."""
    import importlib

    lib = tmp_path / "reload_gone_16.py"
    lib.write_text("def start():\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import reload_gone_16  # type: ignore[import-not-found]

        detach_starter("reload_gone_16:start")
        del reload_gone_16.start  # reload keeps the namespace: remove it by hand
        # A different size: within the same second, a source of the same
        # size would be taken as unchanged and its stale .pyc reloaded
        # (the .pyc records mtime in seconds and size; seen on 3.10 in CI).
        lib.write_text("def other():\n    return 2  # changed\n")
        importlib.invalidate_caches()
        with pytest.warns(RuntimeWarning, match=r"has no attribute 'start' after importlib.reload"):
            importlib.reload(reload_gone_16)
        assert reload_gone_16.other() == 2
        assert "reload_gone_16:start" not in _detach._marked
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("reload_gone_16", None)
        undetach_starter("reload_gone_16:start")
