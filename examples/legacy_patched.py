"""A monkey-patched "legacy" program: threads, a job queue, request ids in every log line.

Old code written for threads runs under ``monkey.patch_all()``: each request is
handled by a ``threading.Thread`` inside ``request_context.run(...)``, starts a
helper thread, and hands jobs to long-lived worker threads through a
``queue.Queue``. ``StoreFilter`` puts the request id on every log line.

A thread started *by the request* inherits its context (the hooks copy it).
A worker thread that *consumes a queue* does not: it runs in the context it
was started in, before any request. So the job must carry the request's
context with it; wrap it when enqueuing, with ``AsyncLocalStorage.bind(fn)``
or ``AsyncLocalStorage.snapshot()``. The one job enqueued bare shows what
happens otherwise: ``-``, no id::

    $ python examples/legacy_patched.py
    [req-1] request-1: start
    [req-1] helper-req-1: checking permissions
    [req-1] worker-1: sending mail to user1@example.com
    [req-1] worker-2: writing audit record for request 1
    [-] worker-1: unbound job (the worker's own context)
    [req-1] request-1: done
    ...

(Thread names and the order vary; the ids never mix.) Exits non-zero if any
job saw another request's id.
"""

from gevent import monkey

monkey.patch_all()  # legacy code: plain threads, queue.Queue, time.sleep

import functools  # noqa: E402
import logging  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

from asl_gevent import AsyncLocalStorage  # noqa: E402
from asl_gevent.logfilter import StoreFilter  # noqa: E402

request_context: AsyncLocalStorage[Dict[str, str]] = AsyncLocalStorage(name="legacy-request")

handler = logging.StreamHandler(sys.stdout)
handler.addFilter(StoreFilter(request_context))
handler.setFormatter(logging.Formatter("[%(request_id)s] %(threadName)s: %(message)s"))
log = logging.getLogger("legacy")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False

jobs: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue()
#: (what the job expected, what it saw) for the final check.
seen: List[Tuple[str, Optional[str]]] = []


def current_id() -> Optional[str]:
    store = request_context.get_store()
    return store["request_id"] if store else None


def worker() -> None:
    """A long-lived worker thread: started once, before any request."""
    while True:
        job = jobs.get()
        try:
            if job is None:
                return
            job()
        finally:
            jobs.task_done()


def send_mail(expected: str, to: str) -> None:
    time.sleep(0.01)  # patched: yields to other threads
    log.info("sending mail to %s", to)
    seen.append((expected, current_id()))


def write_audit(expected: str, n: int) -> None:
    log.info("writing audit record for request %d", n)
    seen.append((expected, current_id()))


def check_permissions(expected: str) -> None:
    time.sleep(0.01)
    log.info("checking permissions")
    seen.append((expected, current_id()))


def handle_request(n: int) -> None:
    expected = f"req-{n}"
    log.info("start")
    # A thread started here inherits the request's context.
    helper = threading.Thread(target=check_permissions, args=(expected,), name=f"helper-{expected}")
    helper.start()
    # Jobs for the workers carry the context with them...
    jobs.put(AsyncLocalStorage.bind(functools.partial(send_mail, expected, f"user{n}@example.com")))
    in_this_request = AsyncLocalStorage.snapshot()
    jobs.put(functools.partial(in_this_request, write_audit, expected, n))
    if n == 1:
        # ...and a bare job runs in the worker's own context: no request id.
        jobs.put(functools.partial(log.info, "unbound job (the worker's own context)"))
    helper.join()
    log.info("done")


def main() -> int:
    workers = [threading.Thread(target=worker, name=f"worker-{i}") for i in (1, 2)]
    for thread in workers:
        thread.start()

    requests = [
        threading.Thread(
            target=request_context.run,
            args=({"request_id": f"req-{n}"}, handle_request, n),
            name=f"request-{n}",
        )
        for n in (1, 2, 3)
    ]
    for thread in requests:
        thread.start()
    for thread in requests:
        thread.join(10)
    jobs.join()
    for _ in workers:
        jobs.put(None)
    for thread in workers:
        thread.join(10)

    wrong = [(expected, got) for expected, got in seen if expected != got]
    if wrong or len(seen) != 3 * 3:
        print(f"MISMATCH: {wrong} ({len(seen)} jobs recorded)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
