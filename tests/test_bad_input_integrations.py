"""Bad input to the integrations: a clear built-in error at the call, nothing changed.

The companion of tests/test_bad_input.py for asl_gevent.wsgi and
asl_gevent.debug: each bad call raises a ``TypeError`` naming the call and
the argument, right where it is made; the stores (this storage's, another
storage's, a plain context variable), here and in a greenlet spawned
afterwards, are as before; and nothing is installed or changed (no signal
handler, no middleware that echoes what the caller turned off).
"""

from __future__ import annotations

import re
import signal
from contextvars import ContextVar
from typing import Any, Callable, Dict, Tuple

import gevent
import pytest

from asl_gevent import AsyncLocalStorage
from asl_gevent import debug
from asl_gevent.wsgi import RequestContextMiddleware, request_id_from, request_storage

OTHER: AsyncLocalStorage[str] = AsyncLocalStorage(name="bad-integrations-other")
VAR: ContextVar[str] = ContextVar("bad_integrations_var", default="var-unset")


def app(environ: Dict[str, Any], start_response: Any) -> Any:
    start_response("200 OK", [])
    return [b""]


CASES: Dict[str, Tuple[Callable[[], Any], str]] = {
    "request_id_from({}, header=3)": (
        lambda: request_id_from({}, header=3),  # type: ignore[arg-type]
        r"^request_id_from\(\) argument 'header' must be a str, not 'int'; "
        r"e\.g\. header='X-Request-ID'$"),
    "request_id_from({}, header=b'X-Request-ID')": (
        lambda: request_id_from({}, header=b"X-Request-ID"),  # type: ignore[arg-type]
        r"^request_id_from\(\) argument 'header' must be a str, not 'bytes'"),
    "RequestContextMiddleware(app, echo_header='no')": (
        lambda: RequestContextMiddleware(app, echo_header="no"),  # type: ignore[arg-type]
        r"^RequestContextMiddleware\(\) argument 'echo_header' must be a bool, not 'str'; "
        r"e\.g\. echo_header=False$"),
    "RequestContextMiddleware(app, echo_header=0)": (
        lambda: RequestContextMiddleware(app, echo_header=0),  # type: ignore[arg-type]
        r"^RequestContextMiddleware\(\) argument 'echo_header' must be a bool, not 'int'"),
    "debug.stores_of(42)": (
        lambda: debug.stores_of(42),  # type: ignore[arg-type]
        r"^stores_of\(\) argument 'glet' must be a greenlet, not 'int'; "
        r"e\.g\. stores_of\(gevent\.getcurrent\(\)\)$"),
    "debug.stores_of(None)": (
        lambda: debug.stores_of(None),  # type: ignore[arg-type]
        r"^stores_of\(\) argument 'glet' must be a greenlet, not 'NoneType'"),
    "debug.install_signal_handler(True)": (
        lambda: debug.install_signal_handler(True),
        r"^install_signal_handler\(\) argument 'signum' must be a signal number, "
        r"not 'bool'; e\.g\. asl_gevent\.debug\.DEFAULT_SIGNAL \(the default; "
        r"SIGUSR1 belongs to gunicorn and uWSGI\)$"),
    "debug.install_signal_handler('USR1')": (
        lambda: debug.install_signal_handler("USR1"),  # type: ignore[arg-type]
        r"^install_signal_handler\(\) argument 'signum' must be a signal number, not 'str'"),
    "debug.uninstall_signal_handler(True)": (
        lambda: debug.uninstall_signal_handler(True),
        r"^uninstall_signal_handler\(\) argument 'signum' must be a signal number, "
        r"not 'bool'"),
}


def state() -> Tuple[Any, Any, Any, Any]:
    return request_storage.get_store(), OTHER.get_store(), VAR.get(), signal.getsignal(signal.SIGHUP)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_call_raises_a_type_error_naming_the_argument_and_changes_nothing(
        name: str) -> None:
    call, match = CASES[name]

    def request() -> None:
        OTHER.enter_with("other-store")
        VAR.set("var-value")
        before = state()
        with pytest.raises(TypeError, match=match):
            call()
        assert state() == before
        assert gevent.spawn(state).get(timeout=5) == before

    before_all = state()
    request_storage.run({"request_id": "r-bad"}, request)
    assert state() == before_all


def test_the_signal_handler_takes_a_signal_enum_and_a_stores_of_a_greenlet() -> None:
    """The checks refuse only what is wrong: signal.SIGUSR1 (an IntEnum) and
    a greenlet still work."""
    original = signal.getsignal(signal.SIGUSR1)
    debug.install_signal_handler(signal.SIGUSR1)
    try:
        assert signal.getsignal(signal.SIGUSR1) is not original
    finally:
        debug.uninstall_signal_handler(signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is original
    assert request_storage.run({"request_id": "r-s"}, lambda: debug.stores_of(
        gevent.getcurrent())) == "request={'request_id': 'r-s'}"


@pytest.mark.parametrize("value,delay", [(True, 5.0), (False, None), (0, None), (2, 2.0)])
def test_leak_watch_true_means_the_default_five_seconds(value: Any, delay: Any) -> None:
    """Documented: leak_watch=True is the default delay (5 s), False is off,
    as 0 is; a number is that many seconds (as ASL_GEVENT_LEAK_WATCH)."""
    middleware = RequestContextMiddleware(app, leak_watch=value)
    watch = middleware._watch
    assert (watch.delay if watch is not None else None) == delay


def test_echo_header_false_echoes_nothing_and_true_echoes_the_id() -> None:
    headers: Dict[str, Any] = {}

    def start_response(status: str, response_headers: Any) -> None:
        headers["got"] = response_headers
    for echo, expected in ((False, []), (True, [("X-Request-ID", "r-e")])):
        list(RequestContextMiddleware(app, echo_header=echo)(
            {"HTTP_X_REQUEST_ID": "r-e"}, start_response))
        assert headers["got"] == expected


def test_every_case_names_its_call() -> None:
    for name, (_, match) in CASES.items():
        called = name.split("(")[0].split(".")[-1]
        assert re.escape(called) in match or called in match, name
