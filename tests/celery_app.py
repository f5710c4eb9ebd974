"""The Celery app the tests run real workers on (``celery -A celery_app worker``).

Configured by the environment, so the pytest process (publisher) and each
worker subprocess agree:

- ``ASL_TEST_BROKER``: the Redis URL (broker and result backend) of the worker;
- ``ASL_TEST_LOG``: a file every task appends its log lines to;
- ``ASL_TEST_INSTALL=0``: negative control, asl_gevent.celery not installed;
- ``ASL_TEST_MARKERS``: a directory for the kill-and-redeliver task's markers.

Each task reports what it saw (returned through the result backend, asserted
in the test) and then *pollutes* its context (stores and a plain ContextVar),
so a leak into the next task on the same process/thread/greenlet shows.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional

from celery import Celery

import asl_gevent.celery
from asl_gevent import AsyncLocalStorage
from asl_gevent.celery import task_storage
from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import request_storage

BROKER = os.environ.get("ASL_TEST_BROKER", "redis://127.0.0.1:6379/0")

#: A second named storage whose store must travel too.
tenant_storage: AsyncLocalStorage[Any] = AsyncLocalStorage(name="tenant")
#: A plain context variable: a task that sets it must not leak it either.
plain_var: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("plain", default=None)

log = logging.getLogger("celery_app.tasks")
log.propagate = False
log.setLevel(logging.INFO)
if os.environ.get("ASL_TEST_LOG"):
    _handler = logging.FileHandler(os.environ["ASL_TEST_LOG"])
    _handler.addFilter(StoreFilter())
    _handler.addFilter(StoreFilter(task_storage, fields=("task_id", "parent_task_id")))
    _handler.setFormatter(logging.Formatter(
        "%(request_id)s %(task_id)s %(parent_task_id)s %(message)s"))
    log.addHandler(_handler)


def seen(label: str) -> Dict[str, Any]:
    """What this task sees now."""
    return {
        "label": label,
        "request": request_storage.get_store(),
        "tenant": tenant_storage.get_store(),
        "task": task_storage.get_store(),
        "plain": plain_var.get(),
    }


def pollute(label: str) -> None:
    request_storage.enter_with({"request_id": f"LEAK-{label}"})
    tenant_storage.enter_with(f"LEAK-{label}")
    task_storage.enter_with({"task_id": "LEAK", "parent_task_id": "LEAK"})
    plain_var.set(f"LEAK-{label}")


# The tasks: plain functions, registered on each app make_app() builds (one
# callable per name, so Celery sees no clash between apps).

def probe(label: str, pause: float = 0.0, spawn: bool = False) -> Dict[str, Any]:
    """Report the stores, optionally from a spawned greenlet too; then pollute."""
    if pause:
        time.sleep(pause)  # patched (cooperative) on the gevent pool
    result = seen(label)
    result["thread"] = threading.get_ident()
    result["pid"] = os.getpid()
    if spawn:
        import gevent
        result["child"] = gevent.spawn(seen, label + "/child").get()
    log.info("probe %s", label)
    pollute(label)
    return result

def publisher(self: Any, label: str) -> str:
    """Publish a probe from inside a task; return the child's task id."""
    result = self.app.signature("probe", (label + "/child",)).delay()
    log.info("publisher %s", label)
    pollute(label)
    return str(result.id)

def step(previous: List[Dict[str, Any]], label: str) -> List[Dict[str, Any]]:
    """A chain/chord step: append what this step sees to the list so far."""
    log.info("step %s", label)
    return [*previous, seen(label)]

def gather(results: List[Any], label: str) -> Dict[str, Any]:
    """A chord body."""
    log.info("gather %s", label)
    return {"parts": results, "body": seen(label)}

def flaky(self: Any, label: str) -> Dict[str, Any]:
    """Fail twice (after polluting), succeed on the third attempt."""
    log.info("flaky %s attempt %d", label, self.request.retries)
    result = seen(label)
    result["retries"] = self.request.retries
    if self.request.retries < 2:
        pollute(label)
        raise self.retry(countdown=0.1)
    return result

def killable(label: str) -> Dict[str, Any]:
    """First delivery: leave a marker and hang (the test SIGKILLs the
    worker). Redelivery: report."""
    marker = os.path.join(os.environ["ASL_TEST_MARKERS"], label)
    log.info("killable %s", label)
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(repr(seen(label)))
        time.sleep(60)
    return seen(label)


def pollute_then_publish(self: Any, label: str) -> str:
    """Set other stores in the body, then publish a probe: the probe carries
    what the body set (the task's continuations must not). Returns its id."""
    pollute(label)
    return str(self.app.signature("probe", (label + "/child",)).delay().id)

def mutate(label: str) -> Dict[str, Any]:
    """Change the received request store in place (no enter_with)."""
    store = request_storage.get_store()
    if store is not None:
        store["request_id"] = f"MUTATED-{label}"
    return seen(label)

def failing(label: str) -> None:
    """Pollute, then fail: the link_error callbacks run."""
    log.info("failing %s", label)
    pollute(label)
    raise ValueError(f"failing {label}")

def errback(task_id: str) -> Dict[str, Any]:
    """A link_error callback (called with the failed task's id)."""
    return {**seen(f"errback-of-{task_id}"), "failed": task_id}


def make_app(broker: str = BROKER, install: bool = True) -> Celery:
    """A Celery app on *broker* with the test tasks (the worker and the test
    process each make one; tasks are found by name)."""
    app = Celery("celery_app", broker=broker, set_as_current=False,
                 backend=broker if broker.startswith("redis:") else None)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A SIGKILLed worker's unacked (acks_late) message comes back after
        # visibility_timeout; sweep for such messages every second (kombu 5.4+).
        broker_transport_options={"visibility_timeout": 3, "unacked_restore_interval": 1,
                                  "unacked_restore_throttle": 1},
        result_expires=600,
    )
    if install:
        asl_gevent.celery.install(app)

    app.task(name="probe")(probe)
    app.task(name="publisher", bind=True)(publisher)
    app.task(name="step")(step)
    app.task(name="gather")(gather)
    app.task(name="flaky", bind=True, max_retries=3)(flaky)
    app.task(name="killable", acks_late=True, reject_on_worker_lost=True)(killable)
    app.task(name="pollute_then_publish", bind=True)(pollute_then_publish)
    app.task(name="failing")(failing)
    app.task(name="mutate")(mutate)
    app.task(name="errback")(errback)
    return app


app = make_app(install=os.environ.get("ASL_TEST_INSTALL", "1") != "0")
