"""OpenTelemetry spans across greenlets: every child keeps its parent.

OpenTelemetry keeps the current span in a :mod:`contextvars` variable. Under
plain gevent a spawned greenlet starts with an empty context, so its spans
start new traces. With ``asl_gevent`` installed (importing it and making a
storage is enough; ``install()`` says so explicitly) every greenlet, pool task
and thread-pool task gets a copy of its spawner's context, and the trace tree
comes out whole. No OpenTelemetry-specific code is needed.

Three concurrent requests, each a trace; the script prints every trace as a
tree built from the spans' *parent ids* (span ids vary from run to run)::

    $ python examples/otel_spans.py
    GET /orders/1  span=5f0c... parent=-
      cache.get[0]  (pool task)  span=9d21... parent=5f0c...
      cache.get[1]  (pool task)  span=0b7e... parent=5f0c...
      db.query  (gevent.spawn)  span=c3aa... parent=5f0c...
        db.connect  (nested gevent.spawn)  span=77e1... parent=c3aa...
      render  (OS thread, gevent ThreadPool)  span=4e19... parent=5f0c...
    GET /orders/2 ...

It exits non-zero if a span lost its parent or landed in another trace.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Dict, List, Optional

import gevent
import gevent.pool
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asl_gevent

asl_gevent.install()

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("examples.otel_spans")

pool = gevent.pool.Pool(4)


def db_query(order: int) -> None:
    with tracer.start_as_current_span("db.query", attributes={"via": "gevent.spawn"}):
        gevent.spawn(db_connect).join()
        gevent.sleep(0.01)  # the query itself: other requests run meanwhile


def db_connect() -> None:
    with tracer.start_as_current_span("db.connect", attributes={"via": "nested gevent.spawn"}):
        gevent.sleep(0.005)


def cache_get(i: int) -> int:
    with tracer.start_as_current_span(f"cache.get[{i}]", attributes={"via": "pool task"}):
        gevent.sleep(0.005)
        return i


def render(order: int) -> str:
    # Runs in a real OS thread: no gevent calls here.
    with tracer.start_as_current_span("render",
                                      attributes={"via": "OS thread, gevent ThreadPool"}):
        return f"order {order}"


def handle(order: int) -> str:
    with tracer.start_as_current_span(f"GET /orders/{order}"):
        query = gevent.spawn(db_query, order)
        pool.map(cache_get, range(2))
        query.join()
        return gevent.get_hub().threadpool.apply(render, (order,))  # type: ignore[no-any-return]


def print_tree(spans: List[ReadableSpan]) -> bool:
    """Print each trace as a tree of parent ids; return whether it is whole."""
    children: Dict[Optional[int], List[ReadableSpan]] = defaultdict(list)
    for span in spans:
        children[span.parent.span_id if span.parent else None].append(span)
    printed = 0
    whole = True

    def show(span: ReadableSpan, depth: int) -> None:
        nonlocal printed, whole
        printed += 1
        via = span.attributes.get("via") if span.attributes else None
        parent = f"{span.parent.span_id:016x}" if span.parent else "-"
        label = f"{span.name}  ({via})" if via else span.name
        print(f"{'  ' * depth}{label}  span={span.context.span_id:016x} parent={parent}")
        for child in sorted(children[span.context.span_id], key=lambda s: s.name):
            if child.context.trace_id != span.context.trace_id:
                whole = False
            show(child, depth + 1)

    for root in sorted(children[None], key=lambda s: s.name):
        show(root, 0)
    return whole and printed == len(spans)


def main() -> int:
    requests = [gevent.spawn(handle, n) for n in (1, 2, 3)]
    gevent.joinall(requests, timeout=30, raise_error=True)
    spans = list(exporter.get_finished_spans())
    whole = print_tree(spans)
    roots = [s for s in spans if s.parent is None]
    if not whole or len(roots) != 3 or len(spans) != 3 * 6:
        print(f"MISMATCH: {len(roots)} roots for 3 requests, {len(spans)} spans",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
