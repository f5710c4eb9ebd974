"""The Celery trust boundary (issue 14, points 1-3), with real workers on a real Redis.

1. Whatever a message's ``asl_gevent`` header holds, the worker runs the task
   (with no stores from a bad header, one warning per cause) and stays up.
2. Publishing never fails because of a store, and a store over
   ``max_store_bytes`` costs nothing like its size.
3. Continuations (chain links, ``link``/``link_error`` callbacks, chord bodies)
   carry the stores their task received, not what its body set; what the body
   publishes itself carries what the body set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from celery import chain, chord, signals

import asl_gevent.celery
from asl_gevent import AsyncLocalStorage
from asl_gevent._celery_codec import header_limit
from asl_gevent.celery import HEADER
from asl_gevent.wsgi import request_storage
from celery_app import make_app, tenant_storage
from xproc_helpers import worker

TIMEOUT = 30


@contextlib.contextmanager
def foreign_publisher() -> Iterator[None]:
    """Publish as a process without asl_gevent.celery would (our signal
    handler would replace the header): the header goes out as given."""
    signals.before_task_publish.disconnect(dispatch_uid="asl_gevent.celery")
    try:
        yield
    finally:
        signals.before_task_publish.connect(asl_gevent.celery._on_publish, weak=False,
                                            dispatch_uid="asl_gevent.celery")


def _deep(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


# (label, header value, expected request store, expected tenant)
HOSTILE: List[Tuple[str, Any, Any, Any]] = [
    # RecursionError in json.loads: killed the solo worker in 0.2, left the
    # task PENDING forever on threads/gevent.
    ("deep", "[" * 100_000, None, None),
    ("deep-again", "[" * 100_000, None, None),
    # What a publisher with 0.2's install() sent for a store nested 960 levels.
    ("deep-store", '{"r":{"request_id":"req-deep"},"s":{"tenant":' + "[" * 960 + '"leaf"'
     + "]" * 960 + "}}", None, None),
    ("not-json", "{not json", None, None),
    ("huge", '{"s":{"tenant":"' + "x" * 3_000_000 + '"}}', None, None),
    ("digits", "1" * 200_000, None, None),
    ("array", "[1,2,3]", None, None),
    ("a-dict", {"r": {"request_id": "req-dict"}}, None, None),
    ("an-int", 7, None, None),
    # Wrong types inside: each bad part dropped alone.
    ("forged", json.dumps({"r": {"request_id": "evil\r\nINFO [admin] forged"},
                           "p": {"evil": 1}, "s": {"tenant": "acme"}}), None, "acme"),
    ("shapes", '{"r":"req-str","s":[1],"p":7}', None, None),
    ("no-id", '{"r":{"user":"u"},"s":{"tenant":"t2"}}', None, "t2"),
    # An unterminated string of escaped quotes at the header limit: ~3 minutes
    # of quadratic string stripping per message before 0.3's second review.
    ("escaped-quotes", '"' + '\\"' * (header_limit(16384) // 2 - 1), None, None),
    # A forged client_request_id beside a valid id: dropped alone.
    ("forged-client", json.dumps({"r": {"request_id": "req-fc", "client_request_id":
                                        "x\nCRITICAL forged", "user": "u"},
                                  "s": {"tenant": "t3"}}), {"request_id": "req-fc", "user": "u"}, "t3"),
]


def _publish_hostile(app: Any) -> List[Tuple[str, Any, Any, Any]]:
    probe = app.signature("probe")
    with foreign_publisher():
        sent = [(label, probe.clone((label,)).apply_async(headers={HEADER: header}),
                 request, tenant) for label, header, request, tenant in HOSTILE]
        # Celery's own parent_id header is broker input too.
        sent.append(("celery-parent", probe.clone(("celery-parent",)).apply_async(
            headers={"parent_id": {"evil": 1}, HEADER: '{"r":{"request_id":"req-ok"}}'}),
            {"request_id": "req-ok"}, None))
        sent.append(("celery-parent-forged", probe.clone(("celery-parent-forged",)).apply_async(
            headers={"parent_id": "p\nCRITICAL forged"}), None, None))
        return sent


POOLS = [("solo", 1), ("prefork", 2), ("threads", 2), ("gevent", 10)]


@pytest.mark.parametrize("pool,concurrency", POOLS, ids=[p for p, _ in POOLS])
def test_a_hostile_header_never_crashes_hangs_or_loses_a_task(
        broker: str, pool: str, concurrency: int) -> None:
    """Each message with a bad asl_gevent header runs its task with no stores
    from the bad parts; the worker stays up and runs a normal task after
    them with its request's stores; each cause is warned once per process.
    On 0.2 the deep header killed the solo worker (and hung the others)."""
    app = make_app(broker)
    with worker(broker, pool, concurrency) as w:
        sent = _publish_hostile(app)
        reports = {label: (result.id, result.get(timeout=TIMEOUT), request, tenant)
                   for label, result, request, tenant in sent}
        after = request_storage.run({"request_id": "req-after"}, tenant_storage.run, "acme-2",
                                    app.signature("probe", ("after",)).delay)
        report_after = after.get(timeout=TIMEOUT)
        assert w.proc is not None and w.proc.poll() is None, w.output()
        output = w.output()
    for label, (task_id, report, request, tenant) in reports.items():
        assert (report["label"], report["request"], report["tenant"], report["task"]) == (
            label, request, tenant, {"task_id": task_id, "parent_task_id": None}), label
    assert report_after["request"] == {"request_id": "req-after"}
    assert report_after["tenant"] == "acme-2"
    processes = concurrency if pool == "prefork" else 1
    for cause in ("nests more than 66 levels", "not valid JSON", "characters, over 262144",
                  "header that is a JSON list", "of type 'dict', not a str",
                  "dropping a request store", "dropping a parent task id",
                  "dropping named stores", "dropping a client_request_id"):
        count = output.count(cause)
        assert 1 <= count <= processes, (cause, count, output[-3000:])
    assert "Unrecoverable error" not in output and "Traceback" not in output, output[-3000:]


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    """Each test sees its own first warnings: "warned once" is per process,
    and an earlier test in the session may have used up a cause."""
    asl_gevent.celery._warned.clear()
    yield


# -- 2. publishing ---------------------------------------------------------------

class _Unserialisable:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


def test_a_store_that_cannot_travel_is_left_out_alone(
        broker: str, caplog: pytest.LogCaptureFixture) -> None:
    """Named stores holding a lone surrogate, a cycle, a non-JSON object, 5 MB,
    or 960 levels of nesting are each left out with one warning (however
    often published); the request store (holding a lone surrogate itself)
    goes as its id alone (with one warning), the good named store goes; the task runs on a real
    worker. On 0.2 the surrogate dropped the whole header with an ERROR
    traceback per publish, and the deep store killed the worker."""
    app = make_app(broker)
    suffix = uuid.uuid4().hex[:8]
    cycle: List[Any] = []
    cycle.append(cycle)
    bad = {"surrogate": {"file": "report-\udcff.csv"}, "cycle": cycle, "object": object(),
           "big": "x" * 5_000_000, "deep": _deep(960)}
    storages = {kind: AsyncLocalStorage(name=f"{kind}-{suffix}") for kind in bad}
    sent: List[Dict[str, Any]] = []

    def record(sender: Any = None, headers: Optional[Dict[str, Any]] = None, **kw: Any) -> None:
        if headers is not None and HEADER in headers:
            sent.append(json.loads(headers[HEADER]))
    signals.before_task_publish.connect(record, weak=False)

    def publish(n: int) -> Any:
        for kind, store in bad.items():
            storages[kind].enter_with(store)
        return tenant_storage.run(f"tenant-{n}", app.signature("probe", (f"bad-{n}",)).delay)
    try:
        with worker(broker, "solo", 1) as w, \
                caplog.at_level(logging.WARNING, "asl_gevent.celery"):
            results = [request_storage.run({"request_id": f"req-bad-{n}", "file": "\udcff"},
                                            publish, n) for n in range(3)]
            reports = [r.get(timeout=TIMEOUT) for r in results]
            output = w.output()
    finally:
        signals.before_task_publish.disconnect(record)
    assert [(r["request"], r["tenant"]) for r in reports] == [
        ({"request_id": f"req-bad-{n}"}, f"tenant-{n}") for n in range(3)]
    assert sent == [{"r": {"request_id": f"req-bad-{n}"}, "s": {"tenant": f"tenant-{n}"}}
                    for n in range(3)]
    ours = [r for r in caplog.records if r.name == "asl_gevent.celery"]
    assert all(r.levelno == logging.WARNING for r in ours)
    messages = [r.getMessage() for r in ours]
    for kind in bad:
        assert len([m for m in messages if f"'{kind}-{suffix}'" in m]) == 1, (kind, messages)
    assert len([m for m in messages if "sending only the ids of the request store" in m]
               ) == 1, messages
    assert "Traceback" not in output, output


def test_the_header_never_outgrows_what_a_worker_reads(caplog: pytest.LogCaptureFixture) -> None:
    """Twenty named stores just under max_store_bytes: the four that would
    take the header past 16 x max_store_bytes (what a worker reads) are left
    out, one warning each."""
    suffix = uuid.uuid4().hex[:8]
    storages = [AsyncLocalStorage(name=f"wide-{suffix}-{i:02}") for i in range(20)]
    store = "x" * 16_000

    def payload() -> Optional[str]:
        for storage in storages:
            storage.enter_with(store)
        return asl_gevent.celery._payload()
    with caplog.at_level(logging.WARNING, "asl_gevent.celery"):
        header = request_storage.run({"request_id": "req-wide"}, payload)
    assert header is not None and len(header) <= header_limit(16384)
    decoded = json.loads(header)
    kept = {n for n in decoded["s"] if n.startswith(f"wide-{suffix}")}
    assert all(decoded["s"][n] == store for n in kept)
    left = [r.getMessage() for r in caplog.records if f"wide-{suffix}" in r.getMessage()]
    # (16,000 + quotes, name and separators) x 16 fit in 262,144 characters.
    assert len(kept) == 16 and len(left) == 4
    assert all("16 x max_store_bytes" in m for m in left)
    assert kept | {m.split("'")[1] for m in left} == {s.name for s in storages}


def _publish_cost(app: Any, big: Optional[str], rounds: int = 7, per: int = 30) -> float:
    """Best-of-rounds seconds per delay() (publish only) to the real Redis."""
    storage = AsyncLocalStorage(name="publish-cost-" + uuid.uuid4().hex[:6])
    probe = app.signature("probe")

    def sample() -> float:
        if big is not None:
            storage.enter_with(big)
        t0 = time.perf_counter()
        for n in range(per):
            probe.clone((f"cost-{n}",)).delay()
        return (time.perf_counter() - t0) / per

    best = [request_storage.run({"request_id": "req-cost"}, sample) for _ in range(rounds)]
    return min(best)


def test_a_store_over_the_limit_costs_nothing_like_its_size(broker: str) -> None:
    """delay() with a 5 MB named store present costs at most 2x a delay()
    without it (0.2: ~45 ms vs ~0.3 ms, json.dumps of all 5 MB every time)."""
    app = make_app(broker)
    big = "x" * 5_000_000
    _publish_cost(app, None, rounds=1)  # connect, warm up
    without = _publish_cost(app, None)
    with_big = _publish_cost(app, big)
    assert with_big <= 2 * without, (with_big, without)


# -- 3. continuations ------------------------------------------------------------

@pytest.mark.parametrize("pool,concurrency", [("solo", 1), ("gevent", 20), ("prefork", 2),
                                              ("threads", 4)])
def test_continuations_carry_the_stores_their_task_received(
        broker: str, pool: str, concurrency: int) -> None:
    """Every task below sets other stores in its body (pollute()). A chain's
    next link, a link callback, a link_error callback and a chord body still
    run with the publishing request's stores; a task the body publishes
    itself runs with what the body set. A store changed in place by the body
    does not change what the continuation carries. On 0.2 the continuations
    saw the body's stores (LEAK-...)."""
    app = make_app(broker)
    sig = app.signature
    ours = ({"request_id": "req-cont"}, "acme")

    def stores(report: Dict[str, Any]) -> Tuple[Any, Any]:
        return report["request"], report["tenant"]

    def publish() -> Dict[str, Any]:
        errback = sig("errback")
        errback_result = errback.freeze()
        return {
            "chain": chain(sig("probe", ("c1",), immutable=True),
                           sig("probe", ("c2",), immutable=True)).delay(),
            "link": sig("probe", ("l0",)).apply_async(
                link=sig("probe", ("l1",), immutable=True)),
            "failing": sig("failing", ("f0",)).apply_async(link_error=errback),
            "errback": errback_result,
            "chord": chord([sig("probe", (f"h{n}",), immutable=True) for n in range(2)],
                           sig("gather", ("body",))).delay(),
            "mutated": chain(sig("mutate", ("m0",), immutable=True),
                             sig("probe", ("after-m",), immutable=True)).delay(),
            "own": chain(sig("pollute_then_publish", ("pp",), immutable=True),
                         sig("probe", ("after-pp",), immutable=True)).delay(),
        }

    with worker(broker, pool, concurrency):
        results = request_storage.run({"request_id": "req-cont"}, tenant_storage.run, "acme",
                                      publish)
        c2 = results["chain"].get(timeout=TIMEOUT)
        c1 = results["chain"].parent.get(timeout=TIMEOUT)
        l0 = results["link"].get(timeout=TIMEOUT)
        l1 = results["link"].children[0].get(timeout=TIMEOUT)
        with pytest.raises(ValueError, match="failing f0"):
            results["failing"].get(timeout=TIMEOUT)
        errback_report = results["errback"].get(timeout=TIMEOUT)
        gathered = results["chord"].get(timeout=TIMEOUT)
        after_m = results["mutated"].get(timeout=TIMEOUT)
        m0 = results["mutated"].parent.get(timeout=TIMEOUT)
        after_pp = results["own"].get(timeout=TIMEOUT)
        child_id = results["own"].parent.get(timeout=TIMEOUT)
        child = app.AsyncResult(child_id).get(timeout=TIMEOUT)

    assert [r["label"] for r in (c1, c2, l0, l1)] == ["c1", "c2", "l0", "l1"]
    assert [stores(r) for r in (c1, c2, l0, l1)] == [ours] * 4
    assert c2["task"]["parent_task_id"] == c1["task"]["task_id"]
    assert l1["task"]["parent_task_id"] == l0["task"]["task_id"]
    assert errback_report["failed"] == results["failing"].id
    assert stores(errback_report) == ours
    assert errback_report["task"]["parent_task_id"] == results["failing"].id
    assert [stores(part) for part in gathered["parts"]] == [ours] * 2
    assert stores(gathered["body"]) == ours
    assert gathered["body"]["task"]["parent_task_id"] in {
        part["task"]["task_id"] for part in gathered["parts"]}
    assert stores(m0) == ({"request_id": "MUTATED-m0"}, "acme")
    assert stores(after_m) == ours  # changed in place: still what m0 received
    assert stores(after_pp) == ours
    assert after_pp["task"]["parent_task_id"] == results["own"].parent.id
    # The body's own publish: what the body set.
    assert stores(child) == ({"request_id": "LEAK-pp"}, "LEAK-pp")
    assert child["task"] == {"task_id": child_id, "parent_task_id": results["own"].parent.id}


# -- 1b. ids that reach log lines (second review: F2, F3, F4, F5) -------------------

def _log_one_task(uuid_: Any, request: Dict[str, Any], *,
                  encoding: str = "utf-8") -> Tuple[str, Any, Any]:
    """Run a task through the real wrapped tracer (asl_gevent.celery's
    _run_task) with *request* as Celery passes it; the body logs one line
    through the two StoreFilters the docs recommend, into a *encoding*
    stream. Returns (what the handler wrote, the task store, the request store)."""
    import io
    from asl_gevent.logfilter import StoreFilter
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding, write_through=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(
        "%(levelname)s [req=%(request_id)s client=%(client_request_id)s task=%(task_id)s "
        "parent=%(parent_task_id)s] %(message)s"))
    handler.addFilter(StoreFilter(fields=("request_id", "client_request_id")))
    handler.addFilter(StoreFilter(asl_gevent.celery.task_storage,
                                  fields=("task_id", "parent_task_id")))
    log = logging.getLogger(f"test-boundary-{uuid.uuid4().hex}")
    log.addHandler(handler)
    log.propagate = False
    seen: Dict[str, Any] = {}

    def tracer(task_id: Any, args: Any, kwargs: Any, request: Any = None, *rest: Any,
               **options: Any) -> None:
        seen["task"] = asl_gevent.celery.task_storage.get_store()
        seen["request"] = request_storage.get_store()
        log.warning("task body ran")

    asl_gevent.celery._wrap_tracer(tracer)(uuid_, (), {}, request)
    return raw.getvalue().decode(encoding), seen["task"], seen["request"]


FORGE = "x\nCRITICAL [req=admin] forged line"


@pytest.mark.parametrize("uuid_,request_,task,req", [
    # F2: a valid request_id beside a forged client_request_id.
    ("t1", {HEADER: json.dumps({"r": {"request_id": "ok-1", "client_request_id": FORGE}})},
     {"task_id": "t1", "parent_task_id": None}, {"request_id": "ok-1"}),
    # F3: Celery's own parent_id header, and the message id itself.
    ("t2", {"parent_id": FORGE}, {"task_id": "t2", "parent_task_id": None}, None),
    (FORGE, {}, {"task_id": None, "parent_task_id": None}, None),
    ("t3", {"parent_id": "p\u2028CRITICAL forged"}, {"task_id": "t3", "parent_task_id": None},
     None),
    # F4: our "p" with U+2028.
    ("t4", {HEADER: json.dumps({"p": "x\u2028CRITICAL forged"})},
     {"task_id": "t4", "parent_task_id": None}, None),
    # Bidi controls: a log viewer would redraw the rest of the line reversed.
    ("t6", {"parent_id": "p\u202e]detrats ksat"}, {"task_id": "t6", "parent_task_id": None},
     None),
    ("t7\u2066x", {}, {"task_id": None, "parent_task_id": None}, None),
    # What a real publisher sends still comes through.
    ("t5", {"parent_id": "parent-1", HEADER: json.dumps(
        {"r": {"request_id": "ok-5", "client_request_id": "c-5"}})},
     {"task_id": "t5", "parent_task_id": "parent-1"},
     {"request_id": "ok-5", "client_request_id": "c-5"}),
], ids=["client-request-id", "celery-parent-id", "task-id", "parent-u2028", "p-u2028",
        "parent-bidi", "task-id-bidi", "fine"])
def test_broker_ids_cannot_forge_log_lines(uuid_: str, request_: Dict[str, Any], task: Any,
                                           req: Any) -> None:
    """The task runs and logs exactly one line; a forged id is None (shown
    as the filter's default), never written into the line."""
    output, task_store, request_store = _log_one_task(uuid_, request_)
    assert (task_store, request_store) == (task, req)
    assert output.count("\n") == 1 and output.startswith("WARNING [req="), output
    assert "CRITICAL" not in output and "\u2028" not in output
    assert "\u202e" not in output and "\u2066" not in output


@pytest.mark.parametrize("request_", [
    {HEADER: '{"p":"\\udfff"}'}, {"parent_id": "\udfff"}, {}],
    ids=["p", "celery-parent-id", "task-id"])
def test_a_lone_surrogate_id_does_not_lose_the_task_s_log_line(request_: Dict[str, Any],
                                                                capsys: Any) -> None:
    """F4: a UTF-8 handler cannot write a lone surrogate; the record was
    lost (logging printed a UnicodeEncodeError to stderr)."""
    uuid_ = "\udfff" if not request_ else "t-sur"
    output, task_store, _ = _log_one_task(uuid_, request_)
    assert output.endswith("task body ran\n"), output
    assert "UnicodeEncodeError" not in capsys.readouterr().err
    assert task_store["parent_task_id"] is None


def test_continuations_re_encode_what_was_received() -> None:
    """F5: a header with 1e999 is refused (it was restored as inf and sent on
    to the next link as Infinity, which that worker refused); what is
    received is re-encoded without NaN/Infinity and decodes again."""
    from asl_gevent._celery_codec import decode
    assert decode('{"r":{"request_id":"rid-1"},"s":{"tenant":1e999}}') is None
    decoded = decode('{"r":{"request_id":"rid-1"},"s":{"tenant":{"n":1.5e308}}}')
    assert decoded is not None
    received = asl_gevent.celery._received(decoded)
    assert received is not None and decode(received) == decoded
