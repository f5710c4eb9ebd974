"""concurrent.futures done-callbacks: what the README promises, with real threads.

``Future.add_done_callback`` is not wrapped: a callback added before the task
ends runs in the executor's worker, after the task, in the worker's empty
context (the task itself ran in a copy of the submitter's); one added after
runs at once in the caller's. ``AsyncLocalStorage.bind(callback)`` gives the
callback the context of the ``add_done_callback`` call either way. 20
concurrent requests (greenlets) on a real 4-thread executor; each asserts the
exact store its callback saw.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Dict, List, Optional

import gevent

from asl_gevent import AsyncLocalStorage

als: AsyncLocalStorage[str] = AsyncLocalStorage(name="done-callbacks")


def _requests(bind: bool) -> Dict[str, List[Optional[str]]]:
    executor = concurrent.futures.ThreadPoolExecutor(4)
    seen: Dict[str, List[Optional[str]]] = {}
    lock = threading.Lock()

    def request(rid: str) -> None:
        release = threading.Event()

        def task() -> Optional[str]:
            release.wait(10)  # not done until both callbacks are added
            return als.get_store()

        def record(future: Any) -> None:
            with lock:
                seen.setdefault(rid, []).append(als.get_store())
        callback = AsyncLocalStorage.bind(record) if bind else record
        future = executor.submit(task)
        future.add_done_callback(callback)       # before the end: the worker runs it
        release.set()
        assert future.result(10) == rid          # the task ran in the request's copy
        future.add_done_callback(callback)       # after: runs here, at once

    try:
        gevent.joinall([gevent.spawn(als.run, f"r{n}", request, f"r{n}") for n in range(20)],
                       raise_error=True)
    finally:
        executor.shutdown(wait=True)             # every worker-run callback has run
    return seen


def test_a_bound_done_callback_sees_its_request_wherever_it_runs() -> None:
    seen = _requests(bind=True)
    assert seen == {f"r{n}": [f"r{n}", f"r{n}"] for n in range(20)}


def test_negative_control_an_unbound_callback_run_by_the_worker_sees_no_store() -> None:
    seen = _requests(bind=False)
    assert {rid: sorted(v, key=str) for rid, v in seen.items()} == {
        f"r{n}": sorted([None, f"r{n}"], key=str) for n in range(20)}
