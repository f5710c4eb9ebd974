"""OpenTelemetry and structlog context follows every spawn path, with no extra code.

Both libraries keep their state in :mod:`contextvars` (OpenTelemetry's
runtime context, structlog's ``bind_contextvars``). The hooks copy the whole
context into every child, so a span started in a request is the parent of the
spans its greenlets, pool tasks and thread-pool tasks start, and a bound
``request_id`` shows up in their log events. Real libraries, real threads.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Tuple

import gevent
import gevent.pool
import gevent.threadpool
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.contextvars import bind_contextvars, merge_contextvars

from helpers import run_scenario

REQUESTS = 50
KINDS = ("spawn", "pool", "executor", "threadpool")


@pytest.fixture(name="otel")
def _otel() -> Iterator[Tuple[trace.Tracer, InMemorySpanExporter]]:
    """A real SDK tracer exporting every finished span to memory. Not set as
    the global provider (that can be set once per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider.get_tracer(__name__), exporter
    finally:
        provider.shutdown()


@pytest.fixture(name="spawners")
def _spawners() -> Iterator[Dict[str, Callable[..., Any]]]:
    """``kind -> start(fn, *args) -> wait()``, one per spawn path.

    The pools are shared by all requests, as in an app, so a worker started
    for one request runs another request's task.
    """
    pool = gevent.pool.Pool(8)
    executor = ThreadPoolExecutor(max_workers=4)
    threadpool = gevent.threadpool.ThreadPool(4)

    def by_spawn(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        return gevent.spawn(fn, *args).get

    def by_pool(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        return pool.spawn(fn, *args).get

    def by_executor(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        future = executor.submit(fn, *args)

        def wait() -> Any:
            # Future.result() would block the hub; poll so other requests run.
            with gevent.Timeout(10):
                while not future.done():
                    gevent.sleep(0.001)
            return future.result()
        return wait

    def by_threadpool(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
        return threadpool.spawn(fn, *args).get

    try:
        yield {"spawn": by_spawn, "pool": by_pool, "executor": by_executor,
               "threadpool": by_threadpool}
    finally:
        executor.shutdown(wait=True)
        threadpool.kill()
        pool.kill()


def _yield(kind: str) -> None:
    """Let sibling greenlets run (only from a greenlet: a real thread has no
    business touching this thread's hub)."""
    if kind in ("spawn", "pool"):
        gevent.sleep(0)


def _by_name(spans: Any) -> Dict[str, ReadableSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), "span names must be unique"
    return named


# -- OpenTelemetry -------------------------------------------------------------


def test_child_spans_keep_their_parent_on_every_path(
        otel: Tuple[trace.Tracer, InMemorySpanExporter],
        spawners: Dict[str, Callable[..., Any]]) -> None:
    """50 concurrent requests each start a root span; spans started in
    spawned greenlets, Pool tasks, ThreadPoolExecutor tasks and gevent
    ThreadPool tasks are its children (same trace, parent = the root), and a
    grandchild in a greenlet spawned inside a child span has that child as
    parent. Every request has its own trace."""
    tracer, exporter = otel
    current_in_child: Dict[str, Any] = {}

    def child(kind: str, n: int) -> None:
        current_in_child[f"{kind}-{n}"] = trace.get_current_span().get_span_context()
        _yield(kind)
        with tracer.start_as_current_span(f"{kind}-{n}"):
            _yield(kind)
            if kind == "spawn":
                gevent.spawn(grandchild, n).get()

    def grandchild(n: int) -> None:
        with tracer.start_as_current_span(f"grandchild-{n}"):
            gevent.sleep(0)

    def request(n: int) -> None:
        with tracer.start_as_current_span(f"request-{n}"):
            gevent.sleep(0)
            waits = [spawners[kind](child, kind, n) for kind in KINDS]
            for wait in waits:
                wait()

    requests = [gevent.spawn(request, n) for n in range(REQUESTS)]
    gevent.joinall(requests, timeout=60, raise_error=True)
    assert all(r.dead for r in requests)

    spans = _by_name(exporter.get_finished_spans())
    assert len(spans) == REQUESTS * (2 + len(KINDS))
    trace_ids = set()
    for n in range(REQUESTS):
        root = spans[f"request-{n}"]
        assert root.parent is None
        trace_ids.add(root.context.trace_id)
        for kind in KINDS:
            span = spans[f"{kind}-{n}"]
            assert span.parent is not None, f"{kind}-{n} lost its parent"
            assert (span.name, span.parent.span_id, span.context.trace_id) == (
                span.name, root.context.span_id, root.context.trace_id)
            assert current_in_child[f"{kind}-{n}"] == root.context
        grandchild_span = spans[f"grandchild-{n}"]
        assert grandchild_span.parent is not None
        assert (grandchild_span.parent.span_id, grandchild_span.context.trace_id) == (
            spans[f"spawn-{n}"].context.span_id, root.context.trace_id)
    assert len(trace_ids) == REQUESTS


def test_without_hooks_a_spawned_span_has_no_parent(
        no_hooks: None, otel: Tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    """Negative control: with the hooks uninstalled a greenlet starts with an
    empty context, so its span starts a new trace (what OpenTelemetry users
    see under plain gevent)."""
    tracer, exporter = otel

    def child() -> None:
        with tracer.start_as_current_span("child"):
            pass

    with tracer.start_as_current_span("root"):
        gevent.spawn(child).get(timeout=10)

    spans = _by_name(exporter.get_finished_spans())
    assert spans["child"].parent is None
    assert spans["child"].context.trace_id != spans["root"].context.trace_id


# -- structlog -----------------------------------------------------------------


@pytest.fixture(name="events")
def _events() -> Iterator[Tuple[Any, List[Dict[str, Any]]]]:
    """A structlog logger whose pipeline is ``merge_contextvars`` and a
    collector (no global structlog configuration is touched)."""
    events: List[Dict[str, Any]] = []

    def collect(logger: Any, method: str, event_dict: Dict[str, Any]) -> Any:
        events.append(dict(event_dict))
        raise structlog.DropEvent

    log = structlog.wrap_logger(structlog.PrintLogger(io.StringIO()),
                                processors=[merge_contextvars, collect])
    yield log, events


def test_structlog_bound_vars_reach_children_and_siblings_stay_apart(
        events: Tuple[Any, List[Dict[str, Any]]],
        spawners: Dict[str, Callable[..., Any]]) -> None:
    """``bind_contextvars(request_id=...)`` in a request is merged into the
    events logged by every greenlet, pool task and thread-pool task it starts;
    50 concurrent requests never see each other's id, and what a child binds
    never reaches its request or its siblings."""
    log, collected = events

    def child(kind: str, n: int) -> None:
        _yield(kind)
        log.info("child", kind=kind)
        bind_contextvars(child=kind)  # a child's binding stays in the child
        _yield(kind)
        log.info("child again", kind=kind)

    def request(n: int) -> None:
        bind_contextvars(request_id=f"r{n}")
        gevent.sleep(0)
        waits = [spawners[kind](child, kind, n) for kind in KINDS]
        for wait in waits:
            wait()
        log.info("after")

    requests = [gevent.spawn(request, n) for n in range(REQUESTS)]
    gevent.joinall(requests, timeout=60, raise_error=True)
    assert all(r.dead for r in requests)

    def key(event: Dict[str, Any]) -> str:
        return json.dumps(event, sort_keys=True)

    expected = []
    for n in range(REQUESTS):
        for kind in KINDS:
            expected.append({"event": "child", "kind": kind, "request_id": f"r{n}"})
            expected.append({"event": "child again", "kind": kind, "request_id": f"r{n}",
                             "child": kind})
        expected.append({"event": "after", "request_id": f"r{n}"})
    assert sorted(map(key, collected)) == sorted(map(key, expected))
    # The test greenlet bound nothing, and no request's binding reached it.
    assert structlog.contextvars.get_contextvars() == {}


def test_without_hooks_structlog_vars_do_not_reach_a_greenlet(
        no_hooks: None, events: Tuple[Any, List[Dict[str, Any]]]) -> None:
    """Negative control: without the hooks a spawned greenlet's events lack
    the request's bound variables."""
    log, collected = events

    def request() -> None:
        bind_contextvars(request_id="r1")
        gevent.spawn(log.info, "child").get(timeout=10)

    gevent.spawn(request).get(timeout=10)
    assert collected == [{"event": "child"}]


# -- monkey-patched process ----------------------------------------------------


def test_patched_threads_and_executor_keep_the_parent_span() -> None:
    """After ``monkey.patch_all`` (which installs the hooks through gevent's
    plugin entry point: no asl_gevent call in the script), spans started in
    ``threading.Thread`` targets and ``ThreadPoolExecutor`` tasks keep the
    request's span as parent, for 20 concurrent requests."""
    proc = run_scenario("otel_patched", timeout=60)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["installed"] is True
    spans = {name: (trace_id, span_id, parent)
             for name, trace_id, span_id, parent in result["spans"]}
    assert len(spans) == 60
    for n in range(20):
        trace_id, span_id, parent = spans[f"request-{n}"]
        assert parent is None
        for kind in ("thread", "executor"):
            assert spans[f"{kind}-{n}"][0::2] == (trace_id, span_id), f"{kind}-{n}"
    assert len({spans[f"request-{n}"][0] for n in range(20)}) == 20

