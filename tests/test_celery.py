"""asl_gevent.celery against a real Redis broker and real ``celery worker`` processes.

The test process publishes (it is the "web process"); the workers run
``tests/celery_app.py``, whose tasks report what they saw through the result
backend and then pollute their own context, so any leak into the next task
on the same process, thread or greenlet shows up in that task's report.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional, Tuple

import pytest
from celery import chain, chord, group, signals

import asl_gevent.celery
from asl_gevent import AsyncLocalStorage
from asl_gevent.celery import HEADER, task_storage
from asl_gevent.wsgi import request_storage
from celery_app import make_app, tenant_storage
from xproc_helpers import wait_for, worker

TIMEOUT = 30

# (pool, concurrency, tasks, pause): gevent with 50 greenlets and tasks that
# overlap; prefork and threads reuse 2 processes / 4 threads many times over.
POOLS = [
    ("gevent", 50, 60, 0.05),
    ("prefork", 2, 24, 0.0),
    ("threads", 4, 24, 0.0),
    ("solo", 1, 16, 0.0),
]


def publish_probes(app: Any, count: int, pause: float, spawn: bool = False
                   ) -> List[Tuple[Optional[str], Optional[str], Any]]:
    """Publish *count* probes; every third outside any request. Returns
    (expected request id, expected tenant, AsyncResult) triples."""
    probe = app.signature("probe")
    published = []
    for n in range(count):
        if n % 3 == 2:
            published.append((None, None, probe.clone((f"out-{n}", pause, spawn)).delay()))
            continue
        rid, tenant = f"req-{n}", f"tenant-{n}"

        def send(n: int = n) -> Any:
            return tenant_storage.run(tenant, probe.clone((f"in-{n}", pause, spawn)).delay)
        published.append((rid, tenant, request_storage.run({"request_id": rid}, send)))
    return published


@pytest.mark.parametrize("pool,concurrency,count,pause", POOLS, ids=[p[0] for p in POOLS])
def test_every_task_sees_its_publishers_stores_and_nothing_else(
        broker: str, pool: str, concurrency: int, count: int, pause: float) -> None:
    """On each pool: a probe published in a request sees that request's store
    and tenant; one published outside a request sees none; none sees a store
    or ContextVar the previous task on its process/thread/greenlet set; each
    knows its own task id. Log lines carry the same ids."""
    app = make_app(broker)
    with worker(broker, pool, concurrency) as w:
        published = publish_probes(app, count, pause, spawn=(pool == "gevent"))
        reports = [(rid, tenant, result.id, result.get(timeout=TIMEOUT))
                   for rid, tenant, result in published]
        lines = w.log_lines()
    runners = set()
    for rid, tenant, task_id, report in reports:
        expected = {
            "label": report["label"],
            "request": {"request_id": rid} if rid else None,
            "tenant": tenant,
            "task": {"task_id": task_id, "parent_task_id": None},
            "plain": None,
        }
        assert {k: report[k] for k in expected} == expected
        if pool == "gevent":  # a greenlet the task spawns inherits all of it
            assert report["child"] == {**expected, "label": report["label"] + "/child"}
        runners.add((report["pid"], report["thread"]))
    if pool != "gevent":  # (there every task is a greenlet of its own)
        # Reuse really happened, so "nothing leaks" was put to the test.
        assert len(runners) < len(reports)
    expected_lines = sorted(f"{rid or '-'} {task_id} - probe {report['label']}"
                            for rid, _, task_id, report in reports)
    assert sorted(lines) == expected_lines


def test_negative_control_without_the_integration_ids_are_missing_and_stores_leak(
        broker: str) -> None:
    """A solo worker without asl_gevent.celery: tasks see no request id, and
    the store one task set is seen by the next (what install() prevents)."""
    app = make_app(broker, install=False)
    with worker(broker, "solo", 1, install=False) as w:
        published = publish_probes(app, 6, 0.0)
        reports = [result.get(timeout=TIMEOUT) for _, _, result in published]
        lines = w.log_lines()
    assert reports[0]["request"] is None and reports[0]["task"] is None
    for previous, report in zip(reports, reports[1:]):
        assert report["request"] == {"request_id": f"LEAK-{previous['label']}"}
        assert report["plain"] == f"LEAK-{previous['label']}"
    assert not any(line.startswith("req-") for line in lines)


def test_canvas_countdown_eta_children_and_retries_keep_the_request(broker: str) -> None:
    """gevent pool: countdown, eta, signature.delay, chain, group, chord, a
    task that publishes a task, and a task retried twice (after it changed its
    own stores) all run with the publishing request's stores; chain steps,
    children and the chord body know their parent; retries keep the task id
    and the first attempt's parent and stores."""
    app = make_app(broker)
    sig = app.signature
    eta = datetime.now(timezone.utc) + timedelta(seconds=0.3)

    def publish() -> Dict[str, Any]:
        return {
            "countdown": sig("probe", ("countdown",)).apply_async(countdown=0.3),
            "eta": sig("probe", ("eta",)).apply_async(eta=eta),
            "delay": sig("probe", ("delay",)).delay(),
            "chain": chain(sig("step", ([], "c1")), sig("step", ("c2",)),
                           sig("step", ("c3",))).delay(),
            "group": group(sig("probe", (f"g{n}",)) for n in range(3)).delay(),
            "chord": chord([sig("step", ([], f"h{n}")) for n in range(3)],
                           sig("gather", ("body",))).delay(),
            "publisher": sig("publisher", ("pub",)).delay(),
            "flaky": sig("flaky", ("flaky",)).delay(),
        }

    with worker(broker, "gevent", 50) as w:
        results = request_storage.run(
            {"request_id": "req-canvas"}, tenant_storage.run, "acme", publish)
        got = {name: r.get(timeout=TIMEOUT) for name, r in results.items()
               if name != "group"}
        got["group"] = results["group"].get(timeout=TIMEOUT)
        child_id = got["publisher"]
        child = app.AsyncResult(child_id).get(timeout=TIMEOUT)
        lines = w.log_lines()

    def stores(report: Dict[str, Any]) -> Tuple[Any, Any, Any]:
        return report["request"], report["tenant"], report["plain"]

    ours = ({"request_id": "req-canvas"}, "acme", None)
    for name in ("countdown", "eta", "delay"):
        assert stores(got[name]) == ours, name
        assert got[name]["task"] == {"task_id": results[name].id, "parent_task_id": None}
    steps = got["chain"]
    assert [stores(s) for s in steps] == [ours] * 3
    assert steps[0]["task"]["parent_task_id"] is None
    assert [s["task"]["parent_task_id"] for s in steps[1:]] == [
        s["task"]["task_id"] for s in steps[:-1]]
    assert [stores(g) for g in got["group"]] == [ours] * 3
    parts, body = got["chord"]["parts"], got["chord"]["body"]
    assert [stores(p[0]) for p in parts] == [ours] * 3
    assert stores(body) == ours
    assert body["task"]["parent_task_id"] in {p[0]["task"]["task_id"] for p in parts}
    assert stores(child) == ours
    assert child["task"] == {"task_id": child_id, "parent_task_id": results["publisher"].id}
    flaky = got["flaky"]
    assert flaky["retries"] == 2
    assert stores(flaky) == ours
    assert flaky["task"] == {"task_id": results["flaky"].id, "parent_task_id": None}
    flaky_lines = sorted(line for line in lines if " flaky " in line)
    assert flaky_lines == [f"req-canvas {results['flaky'].id} - flaky flaky attempt {n}"
                           for n in range(3)]
    assert lines and all(line.startswith("req-canvas ") for line in lines), lines


def test_a_sigkilled_worker_redelivers_the_task_with_its_original_ids(broker: str) -> None:
    """acks_late: the worker is SIGKILLed mid-task; a new worker runs the
    redelivered message (Redis visibility_timeout 3 s) with the original task
    id and the publishing request's stores."""
    app = make_app(broker)
    with worker(broker, "solo", 1, name="first") as first:
        result = request_storage.run({"request_id": "req-kill"}, tenant_storage.run, "acme",
                                     app.signature("killable", ("k1",)).delay)
        marker = first.markers / "k1"
        wait_for(marker.exists, TIMEOUT, "the task to start", first.output)
        first_attempt = marker.read_text()
        first.kill()
        with worker(broker, "solo", 1, name="second", workdir=first.workdir) as second:
            report = result.get(timeout=TIMEOUT)
            lines = second.log_lines()
    assert "'request_id': 'req-kill'" in first_attempt and result.id in first_attempt
    assert report["request"] == {"request_id": "req-kill"}
    assert report["tenant"] == "acme"
    assert report["task"] == {"task_id": result.id, "parent_task_id": None}
    assert lines == [f"req-kill {result.id} - killable k1"] * 2


class _Unserialisable:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


def test_bad_stores_are_left_out_with_one_warning_each_and_never_fail_a_publish(
        broker: str, caplog: pytest.LogCaptureFixture) -> None:
    """A store json cannot encode and a store over max_store_bytes are left out
    of the message, one warning per storage however often they are published;
    the request id still travels (as {"request_id": ...} when the request store
    itself cannot be encoded); the tasks run."""
    app = make_app(broker)
    suffix = uuid.uuid4().hex[:8]
    odd = AsyncLocalStorage(name=f"odd-{suffix}")
    huge = AsyncLocalStorage(name=f"huge-{suffix}")
    fine = AsyncLocalStorage(name=f"fine-{suffix}")
    sent: List[Dict[str, Any]] = []

    def record(sender: Any = None, headers: Optional[Dict[str, Any]] = None, **kw: Any) -> None:
        if headers is not None:
            sent.append(json.loads(headers[HEADER]))
    signals.before_task_publish.connect(record, weak=False)

    def publish(n: int) -> Any:
        odd.enter_with(object())
        huge.enter_with("x" * 100_000)
        fine.enter_with({"n": n})
        return app.signature("probe", (f"bad-{n}",)).delay()
    try:
        with worker(broker, "solo", 1), caplog.at_level(logging.WARNING, "asl_gevent.celery"):
            results = [request_storage.run(_Unserialisable(f"req-bad-{n}"), publish, n)
                       for n in range(3)]
            reports = [r.get(timeout=TIMEOUT) for r in results]
    finally:
        signals.before_task_publish.disconnect(record)
    assert [r["request"] for r in reports] == [{"request_id": f"req-bad-{n}"} for n in range(3)]
    for n, header in enumerate(sent):
        assert header["r"] == {"request_id": f"req-bad-{n}"}
        assert header["s"][f"fine-{suffix}"] == {"n": n}
        assert f"odd-{suffix}" not in header["s"] and f"huge-{suffix}" not in header["s"]
    warned = [r.getMessage() for r in caplog.records if r.name == "asl_gevent.celery"]
    assert len([m for m in warned if f"'odd-{suffix}'" in m]) == 1
    assert len([m for m in warned if f"'huge-{suffix}'" in m]) == 1
    assert len([m for m in warned if "'request'" in m]) <= 1


def test_a_second_storage_with_the_same_name_hides_nothing(broker: str) -> None:
    """Another storage made later with a name in use (by a library, another
    test, a reloaded module) does not hide the first one's stores: the task
    still sees the tenant the publisher set, and the newcomer's own store
    when only it has one."""
    app = make_app(broker)
    shadow: AsyncLocalStorage[Any] = AsyncLocalStorage(name=tenant_storage.name)
    try:
        with worker(broker, "solo", 1):
            first = tenant_storage.run("tenant-first", app.signature("probe", ("dup-1",)).delay)
            second = shadow.run("tenant-shadow", app.signature("probe", ("dup-2",)).delay)
            reports = [first.get(timeout=TIMEOUT), second.get(timeout=TIMEOUT)]
    finally:
        del shadow
    assert [r["tenant"] for r in reports] == ["tenant-first", "tenant-shadow"]


def test_eager_apply_runs_in_a_copy_of_the_callers_context() -> None:
    """apply() (no broker): the task sees the caller's stores and its own task
    id; what it sets does not reach the caller."""
    app = make_app("memory://")

    def call() -> Dict[str, Any]:
        result: Dict[str, Any] = app.tasks["probe"].apply(("eager",)).get()
        result["after"] = (request_storage.get_store(), task_storage.get_store())
        return result
    report = request_storage.run({"request_id": "req-eager"}, call)
    assert report["request"] == {"request_id": "req-eager"}
    assert report["task"]["task_id"] and report["task"]["parent_task_id"] is None
    assert report["after"] == ({"request_id": "req-eager"}, None)


def test_install_rejects_bad_arguments_clearly() -> None:
    with pytest.raises(TypeError, match=r"^asl_gevent\.celery\.install\(\) argument "
                                        r"'celery_app' must be a celery\.Celery app, not 'str'"):
        asl_gevent.celery.install("proj")
    app = make_app("memory://", install=False)
    with pytest.raises(ValueError, match="'max_store_bytes' must be >= 64, not 10"):
        asl_gevent.celery.install(app, max_store_bytes=10)
    with pytest.raises(TypeError, match="'max_store_bytes' must be an int, not 'str'"):
        asl_gevent.celery.install(app, max_store_bytes="10")
    assert not asl_gevent.celery.is_installed(app)
    asl_gevent.celery.install(app)
    asl_gevent.celery.install(app)  # idempotent
    assert asl_gevent.celery.is_installed(app)
