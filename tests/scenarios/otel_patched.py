"""Patched scenario for tests/test_otel_structlog.py (run as a subprocess)."""
from gevent import monkey
monkey.patch_all()

import json, threading
from concurrent.futures import ThreadPoolExecutor
import gevent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import asl_gevent

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("patched")
executor = ThreadPoolExecutor(max_workers=3)

def child(name):
    gevent.sleep(0)
    with tracer.start_as_current_span(name):
        gevent.sleep(0)

def request(n):
    with tracer.start_as_current_span(f"request-{n}"):
        thread = threading.Thread(target=child, args=(f"thread-{n}",))
        thread.start()
        future = executor.submit(child, f"executor-{n}")
        thread.join(10)
        future.result(timeout=10)

gevent.joinall([gevent.spawn(request, n) for n in range(20)],
               timeout=60, raise_error=True)
executor.shutdown()
print(json.dumps({
    "installed": asl_gevent.is_installed(),
    "spans": [[s.name, s.context.trace_id, s.context.span_id,
               s.parent.span_id if s.parent else None]
              for s in exporter.get_finished_spans()],
}))
