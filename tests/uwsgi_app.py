"""The WSGI app tests/test_uwsgi.py serves with a real uWSGI ``--gevent``.

Never imported by pytest itself. uWSGI imports it once in the master and
forks the workers from C afterwards (its default, no ``--lazy-apps``), so
what is made here -- the pool, the logging handler -- is shared by every
worker and its recycled successors, as in a real app.

``$ASL_TEST_PATCH=app`` makes this module call ``monkey.patch_all()`` first
thing, as apps that do not use ``--gevent-monkey-patch`` do; with that option
uWSGI has patched before the import. Either way ``threading.Thread`` below is
a greenlet.

Every path answers JSON: the worker pid, the uWSGI async core, whether
``threading`` is patched, and the request id each kind of work saw -- the
view, ``gevent.spawn``, ``Greenlet(...).start()``, ``Pool.spawn`` and a
patched ``threading.Thread`` (each started per request). ``app`` has the
middleware; ``bare_app`` has not: it makes its own store with
``enter_with`` (and sets a plain context variable) and first reports what it
found there, which must be nothing, whatever the previous request on the
same core set, nor what code the hub ran set there (``/hub`` schedules such a
loop callback; the middleware app checks the plain variable). ``/raise`` raises after setting them (answered 500 by
``bare_app``, as a framework's error handler would). ``/leak`` also leaves a
greenlet and a thread that never end, named after the request id, for the
leak watch (``ASL_GEVENT_LEAK_WATCH``), whose warnings go to
``$ASL_TEST_LOG_DIR/leak-<worker pid>.log``. With ``$ASL_TEST_RUN_INFO`` set,
each worker installs the run-info signal handler after its fork and reports
what happened.
"""

from __future__ import annotations

import os

if os.environ.get("ASL_TEST_PATCH") == "app":
    from gevent import monkey

    monkey.patch_all()

import contextvars  # noqa: E402 - after patch_all on purpose
import json  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
from typing import Any, Callable, Dict, Iterable, Optional  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
from gevent import monkey as _monkey  # noqa: E402
from gevent.greenlet import Greenlet  # noqa: E402

from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_storage  # noqa: E402

POOL = gevent.pool.Pool(16)
#: A plain context variable the bare app sets beside its store.
OWN: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("uwsgi_app.own", default=None)
_never = gevent.event.Event()


class _PerWorkerFile(logging.Handler):
    """Appends to ``leak-<pid>.log``: made in the master, used by each worker."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        path = os.path.join(self.directory, f"leak-{os.getpid()}.log")
        with open(path, "a") as out:
            out.write(self.format(record) + "\n")


if os.environ.get("ASL_TEST_LOG_DIR"):
    logging.getLogger("asl_gevent.leak").addHandler(_PerWorkerFile(os.environ["ASL_TEST_LOG_DIR"]))


#: What install_signal_handler() did in this worker (``$ASL_TEST_RUN_INFO``).
SIGNALS: Dict[str, str] = {}

if os.environ.get("ASL_TEST_RUN_INFO"):
    # In each worker, after uWSGI set its own (C) signal handlers: the app
    # module runs in the master, before the fork.
    from uwsgidecorators import postfork  # type: ignore[import-untyped]

    @postfork  # type: ignore[untyped-decorator]
    def _install_run_info() -> None:
        from asl_gevent.debug import install_signal_handler

        install_signal_handler()  # the default, SIGPWR
        SIGNALS["default"] = "installed"


def _try_sigusr1() -> None:
    """uWSGI's worker has its C handler on SIGUSR1 by the time it serves
    (set after the @postfork functions ran): the run info must refuse it."""
    import signal

    from asl_gevent.debug import install_signal_handler

    try:
        install_signal_handler(signal.SIGUSR1)
        SIGNALS["SIGUSR1"] = "installed"
    except ValueError as exc:
        SIGNALS["SIGUSR1"] = f"ValueError: {exc}"


def _seen() -> Optional[str]:
    gevent.sleep(0)
    return get_request_id()


def _serve(environ: Dict[str, Any], start_response: Callable[..., Any],
           found: Any = None) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    seen: Dict[str, Any] = {"view": get_request_id()}
    gevent.sleep(0.001)  # let the other requests of this worker's cores run
    seen["spawn"] = gevent.spawn(_seen).get()
    started = Greenlet(_seen)
    started.start()
    seen["greenlet_start"] = started.get()
    seen["pool_spawn"] = POOL.spawn(_seen).get()
    box: Dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(thread=_seen()))
    thread.start()
    thread.join()
    seen["thread"] = box.get("thread", "(thread did not run)")
    seen["view_after"] = get_request_id()
    if path == "/leak":
        request_id = get_request_id()
        gevent.spawn(_never.wait).name = f"leaker-greenlet-{request_id}"
        threading.Thread(target=_never.wait, name=f"leaker-thread-{request_id}",
                         daemon=True).start()
    if path == "/hub":
        # Code the hub runs for itself (a loop callback) sets a store and a
        # context variable there; uWSGI spawns every request's greenlet from
        # the hub, and none may copy them.
        gevent.get_hub().loop.run_callback(_set_in_hub, get_request_id())
    if path == "/signals":
        _try_sigusr1()
    if path == "/raise":
        raise RuntimeError("boom after setting the store")
    body = json.dumps({
        "pid": os.getpid(), "core": environ.get("uwsgi.core"), "found": found, "signals": SIGNALS,
        "threading_patched": _monkey.is_module_patched("threading"), "seen": seen,
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _set_in_hub(request_id: Optional[str]) -> None:
    request_storage.enter_with({"request_id": f"hub-{request_id}"})
    OWN.set(f"hub-{request_id}")


def _view(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    # The middleware made the store; nothing else may be there.
    return _serve(environ, start_response, [None, OWN.get()])


app = RequestContextMiddleware(_view)


def bare_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """No middleware: the app makes its own store, as a framework hook would."""
    found = [request_storage.get_store(), OWN.get()]
    request_storage.enter_with({"request_id": environ.get("HTTP_X_REQUEST_ID", "-")})
    OWN.set(environ.get("HTTP_X_REQUEST_ID"))
    try:
        return _serve(environ, start_response, found)
    except RuntimeError:
        # As a framework's error handler does. (An exception that reaches
        # uWSGI itself makes it close the connection without an answer, and
        # its HTTP router then leaves a keep-alive client waiting.)
        start_response("500 Internal Server Error", [("Content-Length", "0")])
        return [b""]
