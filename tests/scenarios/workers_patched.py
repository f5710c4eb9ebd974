"""Patched scenario for tests/test_detach.py (run as a subprocess).

Issue 9's story, with the real libraries: under monkey-patching, a server with
RequestContextMiddleware (leak watch on) whose first request, r1, is the
first to use sentry-sdk (its sender thread starts then), a logging
QueueListener (started lazily by its handler), an OpenTelemetry
BatchSpanProcessor and a PeriodicExportingMetricReader (both created inside
r1). sentry-sdk sends to a collector on 127.0.0.1 through urllib3, which
OpenTelemetry's urllib3 instrumentation traces. Every request also starts a
fire-and-forget thread and greenlet on purpose, and one thread inside
``with detached():``.

Prints one JSON object: in which request's context each library worker ran,
the sender's spans, whether r1's store was collected, what the leak watch
logged. ASL_GEVENT_DETACH_KNOWN=0 in the environment is the negative control.
"""
from gevent import monkey
monkey.patch_all()

import gc
import json
import logging
import logging.handlers
import queue
import threading
import urllib.request
import weakref

import gevent
from gevent.pywsgi import WSGIServer
from opentelemetry import trace
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (MetricExporter, MetricExportResult,
                                              PeriodicExportingMetricReader)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SimpleSpanProcessor,
                                            SpanExporter, SpanExportResult)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import sentry_sdk

import asl_gevent
from asl_gevent import detached
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_id_from

REQUESTS = 12

# -- what the leak watch says ---------------------------------------------------
leaks = []


class ListHandler(logging.Handler):
    def emit(self, record):
        leaks.append(record.getMessage())


logging.getLogger("asl_gevent.leak").addHandler(ListHandler())

# -- a collector for sentry's envelopes, on 127.0.0.1 ---------------------------
received = []


def collector(environ, start_response):
    received.append(environ["wsgi.input"].read())
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b"{}"]


collector_server = WSGIServer(("127.0.0.1", 0), collector, log=None)
collector_server.start()

# -- OpenTelemetry: every span in memory; urllib3 (sentry's transport) traced ----
spans = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(spans))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("scenario")
send_contexts = []  # the request id current where each sentry send runs
URLLib3Instrumentor().instrument(
    request_hook=lambda span, pool, info: send_contexts.append(get_request_id()))

sentry_sdk.init(dsn=f"http://public@127.0.0.1:{collector_server.server_port}/1",
                release="scenario@1")

# -- workers created inside r1 ------------------------------------------------------
worker_contexts = {"queue_listener": [], "batch_span_processor": [], "metric_reader": []}


class RecordingSpanExporter(SpanExporter):
    def export(self, batch):
        worker_contexts["batch_span_processor"].append(get_request_id())
        return SpanExportResult.SUCCESS


class RecordingMetricExporter(MetricExporter):
    def __init__(self):
        super().__init__()

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        worker_contexts["metric_reader"].append(get_request_id())
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        pass


class ContextRecorder(logging.Handler):
    def emit(self, record):
        worker_contexts["queue_listener"].append(get_request_id())


class LazyQueueHandler(logging.handlers.QueueHandler):
    """Starts its QueueListener on the first record, as lazy setups do."""

    listener = None

    def emit(self, record):
        if self.listener is None:
            self.listener = logging.handlers.QueueListener(self.queue, ContextRecorder())
            self.listener.start()
        super().emit(record)


app_log = logging.getLogger("scenario.app")
app_log.propagate = False
app_log.setLevel(logging.INFO)
app_log.addHandler(LazyQueueHandler(queue.Queue()))

made_in_r1 = {}
request_traces = {}
audits = []      # (expected id, id seen) for work a request starts on purpose
detached_audits = []  # id seen by threads started in a detached() block
r1_store = []


class Store(dict):
    """A dict store that a weak reference can watch."""


def audit(kind, expected):
    gevent.sleep(0.01)
    audits.append((kind, expected, get_request_id()))


def app(environ, start_response):
    request_id = get_request_id()
    with tracer.start_as_current_span(f"request {request_id}") as span:
        request_traces[request_id] = span.get_span_context().trace_id
        if not made_in_r1:
            processor = BatchSpanProcessor(RecordingSpanExporter(), schedule_delay_millis=50)
            provider.add_span_processor(processor)
            reader = PeriodicExportingMetricReader(RecordingMetricExporter(),
                                                   export_interval_millis=50)
            meters = MeterProvider(metric_readers=[reader])
            made_in_r1.update(processor=processor, reader=reader, meters=meters)
        made_in_r1["meters"].get_meter("scenario").create_counter("requests").add(1)
        sentry_sdk.capture_message(f"event from {request_id}")
        app_log.info("handled %s", request_id)
        # Fire-and-forget work started on purpose keeps the request's store.
        threading.Thread(target=audit, args=("thread", request_id)).start()
        gevent.spawn(audit, "greenlet", request_id)
        with detached():
            threading.Thread(target=lambda: detached_audits.append(get_request_id())).start()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [request_id.encode()]


def store_factory(environ):
    store = Store(request_id=request_id_from(environ))
    if not r1_store:
        r1_store.append(weakref.ref(store))
    return store


server = WSGIServer(("127.0.0.1", 0),
                    RequestContextMiddleware(app, store_factory=store_factory, leak_watch=0.3),
                    log=None)
server.start()
for n in range(1, REQUESTS + 1):
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/",
                                     headers={"X-Request-ID": f"r{n}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read() == f"r{n}".encode()

sentry_sdk.flush(timeout=10)
made_in_r1["processor"].force_flush(5000)
made_in_r1["reader"].force_flush(5000)
gevent.sleep(1.0)  # the leak watch's delay (0.3 s) and then some
for _ in range(3):
    gc.collect()

request_span_ids = {s.context.span_id for s in spans.get_finished_spans()
                    if s.name.startswith("request ")}
print(json.dumps({
    "installed": asl_gevent.is_installed(),
    "events_received": len(received),
    "send_contexts": send_contexts,
    "send_spans": [
        {"trace_id": s.context.trace_id,
         "parent": s.parent.span_id if s.parent else None,
         "in_request_trace": s.context.trace_id in request_traces.values(),
         "parent_is_request": bool(s.parent and s.parent.span_id in request_span_ids)}
        for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT],
    "worker_contexts": worker_contexts,
    "audits": audits,
    "detached_audits": detached_audits,
    "r1_collected": r1_store[0]() is None,
    "leaks": leaks,
}))
