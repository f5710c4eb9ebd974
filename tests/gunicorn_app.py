"""The Flask app that tests/test_gunicorn.py serves with a real gunicorn.

Never imported by pytest itself: gunicorn workers import it after their
``monkey.patch_all()``, so the pool, executor and threads below are the
patched (greenlet) kinds, created at import time as real apps do.

``app`` is wrapped in :class:`RequestContextMiddleware`; ``bare_app`` is the
same Flask app without it, for the worker-class-alone tests, where the view
sets the request store itself.

Every log line goes to ``$ASL_TEST_LOG_DIR/worker-<pid>.log`` (one file per
worker, so two processes never append to one file) as
``<request_id from StoreFilter> <message>``; each message also carries the id
the view *passed* along explicitly, so the test can tell a foreign id from the
right one.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional

import gevent
import gevent.pool
from flask import Flask, jsonify, request

from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_storage

log = logging.getLogger("gunicorn_app")
_log_dir = os.environ.get("ASL_TEST_LOG_DIR")
if _log_dir:
    _handler = logging.FileHandler(os.path.join(_log_dir, f"worker-{os.getpid()}.log"))
    _handler.addFilter(StoreFilter())
    _handler.setFormatter(logging.Formatter("%(request_id)s %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

# Made once, at import: their workers outlive any one request, which is the
# case where a task could run in the context of the request that started the
# worker instead of its own.
POOL = gevent.pool.Pool(16)
EXECUTOR = ThreadPoolExecutor(max_workers=4)

#: A plain context variable the leak views set, beside the request store.
LEAK_VAR: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "gunicorn_app.leak", default=None)

flask_app = Flask(__name__)


def _task(kind: str, expected: str) -> Optional[str]:
    log.info("task=%s expected=%s", kind, expected)
    return get_request_id()


@flask_app.get("/work")
def work() -> Any:
    """Spawn work on every path, log from each, report what each saw."""
    expected = request.headers["X-Request-ID"]
    before = get_request_id()
    if before is None:
        # No middleware (bare_app): the view makes the request store itself,
        # and only the worker class keeps it from reaching the next request.
        request_storage.enter_with({"request_id": expected})
    log.info("view expected=%s", expected)

    thread_seen: Dict[str, Optional[str]] = {}

    def in_thread() -> None:
        thread_seen["thread"] = _task("thread", expected)

    thread = threading.Thread(target=in_thread)
    thread.start()
    spawned = gevent.spawn(_task, "spawn", expected)
    pooled = POOL.spawn(_task, "pool", expected)
    submitted = EXECUTOR.submit(_task, "executor", expected)
    # A real OS thread (gevent's hub threadpool); it reports, it does not log.
    in_os_thread = gevent.get_hub().threadpool.spawn(get_request_id)
    seen = {
        "spawn": spawned.get(timeout=10),
        "pool": pooled.get(timeout=10),
        "executor": submitted.result(timeout=10),
        "threadpool": in_os_thread.get(timeout=10),
    }
    thread.join(10)
    seen.update(thread_seen)
    return jsonify(expected=expected, before=before, seen=seen,
                   after=get_request_id(), pid=os.getpid())


def _state() -> Dict[str, Any]:
    return {"store": request_storage.get_store(), "var": LEAK_VAR.get()}


@flask_app.get("/peek")
def peek() -> Any:
    """What this request starts with, here and in a greenlet it spawns."""
    return jsonify(here=_state(), spawned=gevent.spawn(_state).get(timeout=10),
                   greenlet=id(gevent.getcurrent()), pid=os.getpid())


@flask_app.get("/leak")
def leak() -> Any:
    """Report the starting state, then set a store and a contextvar for good
    (``enter_with``/``set``, no scope), and raise if asked to."""
    state = _state()
    tag = request.args["tag"]
    request_storage.enter_with({"request_id": f"leaked-{tag}"})
    LEAK_VAR.set(f"leaked-{tag}")
    if request.args.get("raise"):
        raise RuntimeError(f"view raised after enter_with (tag {tag})")
    return jsonify(here=state, greenlet=id(gevent.getcurrent()), pid=os.getpid())


app = RequestContextMiddleware(flask_app)
bare_app = flask_app
