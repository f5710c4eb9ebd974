"""StoreFilter and store_processor: store fields on every log record."""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, Iterator, List, Tuple

import gevent
import gevent.event
import gevent.pool
import gevent.threadpool
import pytest
import structlog
from structlog.testing import CapturingLogger

from asl_gevent import AsyncLocalStorage
from asl_gevent.logfilter import StoreFilter, store_processor
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id
from helpers import ListHandler, run_python

#: Named by dotted path in the tests below, as a logging config file would.
STORAGE: AsyncLocalStorage[Dict[str, Any]] = AsyncLocalStorage(name="logfilter-tests")


@pytest.fixture(name="logger")
def _logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """A private logger that does not propagate to pytest's handlers."""
    logger = logging.getLogger(f"tests.logfilter.{request.node.name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for log_filter in list(logger.filters):
            logger.removeFilter(log_filter)


def attach(logger: logging.Logger, log_filter: logging.Filter, *, on_logger: bool = False,
           ) -> ListHandler:
    handler = ListHandler()
    (logger if on_logger else handler).addFilter(log_filter)
    logger.addHandler(handler)
    return handler


def fields(record: logging.LogRecord, *names: str) -> Tuple[Any, ...]:
    return tuple(getattr(record, name, "<unset>") for name in names)


# -- StoreFilter ----------------------------------------------------------------


@pytest.mark.parametrize("on_logger", [False, True], ids=["handler", "logger"])
def test_records_from_concurrent_requests_and_their_greenlets_carry_their_own_fields(
        logger: logging.Logger, on_logger: bool) -> None:
    """40 concurrent requests each log from the request, from 2 spawned
    greenlets, a Pool task and a gevent ThreadPool (OS thread) task; every
    record carries its own request's fields, on a handler or a logger."""
    handler = attach(logger, StoreFilter(STORAGE, fields=("request_id", "user")),
                     on_logger=on_logger)
    pool = gevent.pool.Pool(10)
    threadpool = gevent.threadpool.ThreadPool(3)

    def request(n: int) -> None:
        logger.info("request r%d", n)
        children = [gevent.spawn(logger.info, "spawn r%d", n) for _ in range(2)]
        gevent.sleep(0)
        pool.spawn(logger.info, "pool r%d", n).get()
        threadpool.spawn(logger.info, "thread r%d", n).get()
        gevent.joinall(children, raise_error=True)

    try:
        greenlets = [gevent.spawn(STORAGE.run, {"request_id": f"r{n}", "user": f"u{n}"},
                                  request, n) for n in range(40)]
        assert len(gevent.joinall(greenlets, timeout=60, raise_error=True)) == 40
    finally:
        threadpool.kill()
    assert len(handler.records) == 40 * 5
    for record in handler.records:
        n = record.getMessage().split()[1][1:]
        assert fields(record, "request_id", "user") == (f"r{n}", f"u{n}")


def test_placeholder_outside_a_store_and_for_missing_fields(logger: logging.Logger) -> None:
    """No store, a missing key, a None value, or a store without the
    attribute: the field is the placeholder, so format strings never fail."""
    handler = attach(logger, StoreFilter(STORAGE, fields=("request_id", "user"), placeholder="?"))
    handler.setFormatter(logging.Formatter("[%(request_id)s %(user)s] %(message)s"))
    logger.info("outside")
    STORAGE.run({"request_id": "r1"}, logger.info, "missing user")
    STORAGE.run({"request_id": None, "user": "u"}, logger.info, "none id")
    STORAGE.run(object(), logger.info, "object store")  # type: ignore[arg-type]
    assert [handler.format(r) for r in handler.records] == [
        "[? ?] outside", "[r1 ?] missing user", "[? u] none id", "[? ?] object store"]


def test_object_stores_are_read_by_attribute(logger: logging.Logger) -> None:
    """A non-mapping store is read with getattr."""
    class Store:
        request_id = "attr-1"

    handler = attach(logger, StoreFilter(STORAGE))
    STORAGE.run(Store(), logger.info, "hi")  # type: ignore[arg-type]
    assert fields(handler.records[0], "request_id") == ("attr-1",)


def test_extra_fields_are_not_overwritten(logger: logging.Logger) -> None:
    """A field the record already has (from extra=) is left alone."""
    handler = attach(logger, StoreFilter(STORAGE))
    STORAGE.run({"request_id": "from-store"}, logger.info, "x", extra={"request_id": "explicit"})
    assert fields(handler.records[0], "request_id") == ("explicit",)


def test_default_storage_is_the_middlewares(logger: logging.Logger) -> None:
    """StoreFilter() reads asl_gevent.wsgi.request_storage: records logged
    inside a request served by RequestContextMiddleware, and in greenlets
    spawned there while the response is iterated, carry its id."""
    handler = attach(logger, StoreFilter())

    def app(environ: Dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        logger.info("app")
        yield gevent.spawn(lambda: (logger.info("child"), b"x")[1]).get()

    for rid in ("req-a", "req-b"):
        body = RequestContextMiddleware(app)({"HTTP_X_REQUEST_ID": rid}, lambda *a: None)
        assert list(body) == [b"x"]
    logger.info("after")
    assert [(r.getMessage(), fields(r, "request_id")[0]) for r in handler.records] == [
        ("app", "req-a"), ("child", "req-a"), ("app", "req-b"), ("child", "req-b"),
        ("after", "-")]
    assert get_request_id() is None


def test_disabled_storage_gives_the_placeholder(logger: logging.Logger) -> None:
    """After storage.disable() the filter sees no store, even in a greenlet
    that had one."""
    storage: AsyncLocalStorage[Dict[str, str]] = AsyncLocalStorage(name="disable")
    handler = attach(logger, StoreFilter(storage))
    go = gevent.event.Event()

    def request() -> None:
        logger.info("before")
        go.wait(timeout=30)
        logger.info("after")

    greenlet = gevent.spawn(storage.run, {"request_id": "r"}, request)
    gevent.sleep(0)
    storage.disable()
    go.set()
    greenlet.get(timeout=30)
    assert [fields(r, "request_id")[0] for r in handler.records] == ["r", "-"]


def test_a_store_that_raises_does_not_break_logging(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    """A store whose attribute access (or .get) raises: records are still
    emitted, with the placeholder; the error is reported once on the
    asl_gevent.logfilter logger, not raised into the code that logs."""
    class Exploding:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"no {name} for you")

    class ExplodingMapping(dict):  # type: ignore[type-arg]
        def get(self, *args: Any) -> Any:
            raise KeyError("broken mapping")

    handler = attach(logger, StoreFilter(STORAGE, fields=("request_id", "user")))
    with caplog.at_level(logging.WARNING, logger="asl_gevent.logfilter"):
        for store in (Exploding(), ExplodingMapping(), Exploding()):
            STORAGE.run(store, logger.info, "still logged")  # type: ignore[arg-type]
            gevent.spawn(STORAGE.run, store, logger.warning, "from a greenlet").get()
    assert [(r.getMessage(), fields(r, "request_id", "user")) for r in handler.records] == [
        ("still logged", ("-", "-")), ("from a greenlet", ("-", "-"))] * 3
    reports = [r for r in caplog.records if r.name == "asl_gevent.logfilter"]
    assert len(reports) == 1
    assert reports[0].exc_info is not None and reports[0].exc_info[0] is RuntimeError


def test_filter_by_dictconfig_in_a_subprocess() -> None:
    """dictConfig builds the filter with "()" and names the storage by dotted
    path ("pkg.module:attr" and "pkg.module.attr"); records from a request's
    spawned greenlets carry its id; outside a request, the placeholder."""
    proc = run_python(r"""
        import json, logging, logging.config
        import gevent
        from asl_gevent.wsgi import request_storage

        logging.config.dictConfig({
            "version": 1,
            "filters": {
                "colon": {"()": "asl_gevent.logfilter.StoreFilter",
                          "storage": "asl_gevent.wsgi:request_storage",
                          "fields": ["request_id", "user"], "placeholder": "none"},
                "dotted": {"()": "asl_gevent.logfilter.StoreFilter",
                           "storage": "asl_gevent.wsgi.request_storage"},
                "default": {"()": "asl_gevent.logfilter.StoreFilter", "fields": "user"},
            },
            "formatters": {"plain": {"format": "%(message)s"}},
            "handlers": {"out": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                                 "formatter": "plain",
                                 "filters": ["colon", "dotted", "default"]}},
            "root": {"level": "INFO", "handlers": ["out"]},
        })

        class Json(logging.Formatter):
            def format(self, record):
                return json.dumps([record.getMessage(), record.request_id, record.user])
        logging.getLogger().handlers[0].setFormatter(Json())
        log = logging.getLogger("app")

        def handler(n):
            gevent.joinall([gevent.spawn(log.info, "child r%d" % n) for _ in range(3)])

        log.info("outside")
        gevent.joinall([gevent.spawn(request_storage.run, {"request_id": "r%d" % n,
                                                           "user": "u%d" % n}, handler, n)
                        for n in range(10)])
    """)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0] == ["outside", "none", "none"]
    assert len(lines) == 1 + 10 * 3
    for message, request_id, user in lines[1:]:
        n = message.split()[1][1:]
        assert (request_id, user) == (f"r{n}", f"u{n}")


# -- construction errors ----------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"storage": 42}, TypeError,
     r"^StoreFilter\(\) argument 'storage' must be an AsyncLocalStorage, a dotted path "
     r"such as 'myapp.context:request_storage', or None, not 'int'$"),
    ({"storage": "no_such_module_xyz:storage"}, ValueError,
     r"^StoreFilter\(\) argument 'storage' names 'no_such_module_xyz:storage', which "
     r"cannot be imported \(ModuleNotFoundError: "),
    ({"storage": "asl_gevent.wsgi:get_request_id"}, TypeError,
     r"^StoreFilter\(\) argument 'storage' names 'asl_gevent.wsgi:get_request_id', which "
     r"is a 'function', not an AsyncLocalStorage$"),
    ({"fields": 5}, TypeError, r"^StoreFilter\(\) argument 'fields' must be an iterable of str"),
    ({"fields": ["ok", 3]}, TypeError,
     r"^StoreFilter\(\) argument 'fields' must hold non-empty str names, not 3"),
    ({"fields": ("request_id", "msg", "message")}, ValueError,
     r"^StoreFilter\(\) argument 'fields' names LogRecord attributes \['msg', 'message'\]"),
])
def test_bad_filter_arguments_raise_at_construction(
        kwargs: Dict[str, Any], error: type, pattern: str) -> None:
    """Bad storage or fields fail when the filter is made, naming the argument."""
    with pytest.raises(error, match=pattern):
        StoreFilter(**kwargs)


def test_storage_by_dotted_path_in_this_module() -> None:
    """Both path spellings resolve to the same storage object."""
    assert StoreFilter(f"{__name__}:STORAGE").storage is STORAGE
    assert StoreFilter(f"{__name__}.STORAGE").storage is STORAGE


# -- structlog processor ------------------------------------------------------------


def structlog_logger(processor: Any) -> Tuple[Any, CapturingLogger]:
    """A real structlog BoundLogger whose chain ends in a CapturingLogger."""
    capture = CapturingLogger()
    return structlog.wrap_logger(capture, processors=[processor]), capture


def test_structlog_processor_in_spawned_greenlets() -> None:
    """Events logged by 30 concurrent requests and their spawned greenlets get
    their own request's fields; a field the event already has is kept; a
    field missing from the store is omitted, and so is every field outside a
    store."""
    log, capture = structlog_logger(store_processor(STORAGE, fields=("request_id", "user")))

    def request(n: int) -> None:
        log.info("request", expected=f"r{n}")
        gevent.joinall([gevent.spawn(log.info, "child", expected=f"r{n}") for _ in range(3)],
                       raise_error=True)
        log.info("explicit", expected="mine", request_id="mine")

    stores = [{"request_id": f"r{n}", **({"user": f"u{n}"} if n % 2 else {})} for n in range(30)]
    greenlets = [gevent.spawn(STORAGE.run, store, request, n) for n, store in enumerate(stores)]
    assert len(gevent.joinall(greenlets, timeout=60, raise_error=True)) == 30
    log.info("outside")

    calls = capture.calls
    assert len(calls) == 30 * 5 + 1
    for call in calls[:-1]:
        n = int(call.kwargs["expected"][1:]) if call.kwargs["expected"] != "mine" else None
        assert call.kwargs["request_id"] == call.kwargs["expected"]
        if n is not None:
            assert call.kwargs.get("user") == (f"u{n}" if n % 2 else None)
            assert ("user" in call.kwargs) == bool(n % 2)
    assert calls[-1].kwargs == {"event": "outside"}


def test_structlog_processor_with_the_middleware_and_a_broken_store(
        caplog: pytest.LogCaptureFixture) -> None:
    """store_processor() reads the middleware's storage by default; a store
    that raises leaves the event without the field and reports once."""
    log, capture = structlog_logger(store_processor())

    def app(environ: Dict[str, Any], start_response: Any) -> List[bytes]:
        start_response("200 OK", [])
        gevent.spawn(log.info, "child").get()
        return []

    RequestContextMiddleware(app)({"HTTP_X_REQUEST_ID": "slog-1"}, lambda *a: None)

    class Exploding:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("broken")

    broken_log, broken_capture = structlog_logger(store_processor(STORAGE))
    with caplog.at_level(logging.WARNING, logger="asl_gevent.logfilter"):
        for _ in range(2):
            STORAGE.run(Exploding(), broken_log.info, "broken")  # type: ignore[arg-type]
    assert [c.kwargs for c in capture.calls] == [{"event": "child", "request_id": "slog-1"}]
    assert [c.kwargs for c in broken_capture.calls] == [{"event": "broken"}] * 2
    assert len([r for r in caplog.records if r.name == "asl_gevent.logfilter"]) == 1


def test_structlog_processor_bad_arguments() -> None:
    """Bad arguments fail at construction, naming store_processor()."""
    with pytest.raises(TypeError, match=r"^store_processor\(\) argument 'storage' must be"):
        store_processor(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^store_processor\(\) argument 'fields' must hold"):
        store_processor(STORAGE, fields=[""])


def test_logging_in_threads_of_a_real_pool_is_tagged(logger: logging.Logger) -> None:
    """Records from ThreadPoolExecutor tasks (real threads) submitted in a
    store carry that store's id (the hooks run each task in its submitter's
    context)."""
    import concurrent.futures

    handler = attach(logger, StoreFilter(STORAGE))
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        futures = [STORAGE.run({"request_id": f"t{n}"}, executor.submit, logger.info, "t%d", n)
                   for n in range(8)]
        for future in futures:
            future.result(timeout=30)
    assert sorted((r.getMessage(), fields(r, "request_id")[0]) for r in handler.records) == \
        sorted((f"t{n}", f"t{n}") for n in range(8))


@pytest.mark.parametrize("where", ["listener-handler", "queue-handler"])
def test_with_queue_handler_the_filter_belongs_on_the_queue_handler(
        logger: logging.Logger, where: str) -> None:
    """QueueHandler/QueueListener, 200 concurrent requests logging from the
    request and from a greenlet each spawns. The habit -- StoreFilter on the
    listener's handler -- runs the filter in the listener's thread, where no
    request is current: every record gets '-'. On the QueueHandler (as the
    README says) it runs in the request and every record carries its own id
    through the queue, also when the listener's handler has one too."""
    import logging.handlers
    import queue

    from asl_gevent.wsgi import request_storage

    log_queue: "queue.Queue[logging.LogRecord]" = queue.Queue()
    queue_handler = logging.handlers.QueueHandler(log_queue)
    sink = ListHandler()
    sink.addFilter(StoreFilter())  # both setups have it: what a user writes first
    if where == "queue-handler":
        queue_handler.addFilter(StoreFilter())
    logger.addHandler(queue_handler)
    listener = logging.handlers.QueueListener(log_queue, sink)
    listener.start()
    try:
        def request(n: int) -> None:
            logger.info("r%d view", n)
            gevent.sleep(0)
            gevent.spawn(logger.info, "r%d greenlet", n).join()

        gevent.joinall([gevent.spawn(request_storage.run, {"request_id": f"r{n}"}, request, n)
                        for n in range(200)], raise_error=True)
    finally:
        listener.stop()  # drains the queue

    assert len(sink.records) == 400
    logged = [(record.getMessage().split()[0], getattr(record, "request_id"))
              for record in sink.records]
    if where == "queue-handler":
        assert [(msg, rid) for msg, rid in logged if msg != rid] == []
    else:
        assert {rid for _, rid in logged} == {"-"}
