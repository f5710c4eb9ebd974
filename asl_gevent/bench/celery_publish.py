"""Celery publishing with a store over ``max_store_bytes`` present (issue 14).

``celery/publish_5mb``: ``delay()`` to a local Redis, asl_gevent.celery
installed on both sides, inside a request store; the subject also has a
5 MB named store current, which is too big to travel. 0.2 encoded all of it
on every publish (~45 ms instead of ~0.3 ms); it is refused now after work
bounded by ``max_store_bytes``. Publishing only: no worker runs the tasks.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

from .._storage import AsyncLocalStorage
from ..wsgi import request_storage
from ._core import Options, Row, Target, Variant, paired, skip
from .xproc import celery_unavailable, start_redis, stop

__all__ = ["publish_rows"]

_BIG = 5_000_000


def _rows(opts: Options) -> Iterator[Row]:
    from celery import Celery

    from .. import celery as asl_celery

    workdir = tempfile.mkdtemp(prefix="asl-bench-publish-")
    redis, port = start_redis(workdir)
    try:
        broker = f"redis://127.0.0.1:{port}/3"
        app = Celery("asl_bench_publish", broker=broker, set_as_current=False)
        app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
        asl_celery.install(app)
        big: AsyncLocalStorage[str] = AsyncLocalStorage(name="asl_bench.big")
        noop = app.signature("noop", (0,))
        deadline = time.monotonic() + 30
        while True:  # until Redis answers (the first publish connects)
            try:
                request_storage.run({"request_id": "bench-request"}, noop.delay)
                break
            except Exception:
                if time.monotonic() > deadline or redis.poll() is not None:
                    raise
                time.sleep(0.1)
        blob = "x" * _BIG

        def sampler(store: Any) -> Callable[[int], float]:
            def sample(n: int) -> float:
                def publish() -> float:
                    if store is not None:
                        big.enter_with(store)
                    delay = noop.delay
                    t0 = time.perf_counter()
                    for _ in range(n):
                        delay()
                    return (time.perf_counter() - t0) / n
                return float(request_storage.run({"request_id": "bench-request"}, publish))
            return sample

        base, subj = paired(Variant(sampler(None)), Variant(sampler(blob)), opts)
        yield Row("celery/publish_5mb", "Celery delay() with a 5 MB named store present "
                  "vs without", "s", base, subj, Target("<=", 2.0),
                  note="publish only, Redis on loopback; the store is over "
                       "max_store_bytes and left out")
    finally:
        stop(redis)
        shutil.rmtree(workdir, ignore_errors=True)


def publish_rows(opts: Options, wanted: Callable[[str], bool]) -> Iterator[Row]:
    """The figure; skipped, saying why, without Celery, redis-py or redis-server."""
    if not wanted("celery/publish_5mb"):
        return
    reason = celery_unavailable()
    if reason is not None:
        skip("celery/publish_5mb", reason)
    else:
        yield from _rows(opts)
