"""The Celery app of the ``celery/solo`` figure (imported by its workers).

``ASL_BENCH_BROKER`` names the Redis URL; ``ASL_BENCH_CELERY=1`` installs
:mod:`asl_gevent.celery` (the subject), anything else leaves it out (the
baseline). Imported only where Celery is installed.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("asl_bench", broker=os.environ.get("ASL_BENCH_BROKER", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("ASL_BENCH_BROKER", "redis://127.0.0.1:6379/0"),
             set_as_current=False)
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
                worker_prefetch_multiplier=1, task_serializer="json", result_serializer="json")
if os.environ.get("ASL_BENCH_CELERY") == "1":
    import asl_gevent.celery

    asl_gevent.celery.install(app)


@app.task(name="noop")  # type: ignore[untyped-decorator]  # celery ships no types
def noop(n: int) -> int:
    return n
