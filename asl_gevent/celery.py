"""Celery tasks carry the request's stores; every task runs in its own context.

One call per Celery app, in the module that makes the app (so the web
process and the worker both run it)::

    from celery import Celery
    import asl_gevent.celery

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    asl_gevent.celery.install(app)

Publishing (``delay``, ``apply_async``, ``send_task``, signatures, chains,
groups, chords, retries, ``countdown``/``eta``): the message gets one header,
``asl_gevent``, holding the current stores as JSON -- the request's store
(:data:`asl_gevent.wsgi.request_storage`) and the store of every other
*named* storage (``AsyncLocalStorage(name=...)``), skipping storages with no
store. Each store is encoded alone: one that is not JSON (a non-JSON type, a
cycle, NaN, a lone surrogate), nests more than 64 containers, or is larger
than ``max_store_bytes`` once encoded is left out with one warning per
storage, and the other stores and the request id still go; the publish never
fails because of a store. A store over the limit is refused after work
bounded by ``max_store_bytes``, never encoded whole (a 5 MB store costs
what a 16 KB one does). The request's store travels only if its
``request_id`` would pass as an incoming ``X-Request-ID`` (workers drop it
otherwise); if it cannot be encoded, its ids alone are sent,
``{"request_id": ..., "client_request_id": ...}`` (the second if present and
valid).
The header stays within ``16 * max_store_bytes`` characters (what a worker
reads): a named store that would take it past that is left out too.

The request's store is read from the storage of the
:class:`~asl_gevent.wsgi.RequestContextMiddleware` serving the request, if it
was given ``storage=`` (else from :data:`~asl_gevent.wsgi.request_storage`);
in the worker it is restored into :data:`~asl_gevent.wsgi.request_storage`
(so :func:`~asl_gevent.wsgi.get_request_id` and the log filter find it), and,
if that storage is named, it also travels under its name like any named
storage and is restored into the worker's storage of that name.

Running, in the worker: each task runs in its own copy of the worker's
context, on every pool (``prefork``, ``solo``, ``threads``, ``gevent``), with

- the published stores restored, as stores of the storages of the same names
  (JSON values: a dict store comes back as an equal dict, a tuple as a list);
- :data:`task_storage` holding ``{"task_id": ..., "parent_task_id": ...}``
  (the parent is the task that published this one, ``None`` for a task
  published outside a task; a retry keeps its ``task_id``).

Nothing a task sets reaches the next task on the same process, thread or
greenlet, and a task published outside any request runs with no request
store. A task that publishes tasks passes its stores on: what its body
publishes carries the stores as the body left them, while what Celery
publishes for it after the body (the next link of a chain, ``link`` and
``link_error`` callbacks, a chord's body) carries the stores the task
received, as a retry does. Tasks run eagerly (``apply()``,
``task_always_eager``) run in a copy of the caller's context.

The header comes from the broker, so from anyone who can publish there: the
worker reads it within bounds fixed before decoding (``16 *
max_store_bytes`` characters, 66 levels of nesting), catches every error,
and keeps only what has the declared shape (a request store whose
``request_id`` passes ``X-Request-ID``'s checks, its ``client_request_id``
only if it does too, named stores as a JSON object without lone surrogates, finite
numbers). The task id and parent task id that enter :data:`task_storage`
are ``None`` unless they are 1 to 255 characters without control
characters, U+2028/U+2029, bidi controls or lone surrogates, so they cannot forge log
lines. A bad header, or a
bad part of one, is dropped with one warning per cause and the task runs
without it; the worker never fails, hangs or loses a task because of it.

To log the ids in the worker, put two :class:`~asl_gevent.logfilter.StoreFilter`
on the handler::

    handler.addFilter(StoreFilter())                      # %(request_id)s
    handler.addFilter(StoreFilter(task_storage, fields=("task_id", "parent_task_id")))

How: publishing uses Celery's ``before_task_publish`` signal; running wraps
the function ``celery.app.trace.build_tracer`` returns for the app's tasks
(every pool runs a task through it), so Celery's own ``task_prerun``/
``task_postrun`` handlers and its "Task ... succeeded" log line run inside the
task's context too.

.. versionadded:: 0.2
.. versionchanged:: 0.3
   The worker checks the header (bounded, never raises) and the task
   ids; a store that
   cannot travel is left out alone without being encoded whole;
   continuations carry the stores their task received.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import weakref
from contextvars import ContextVar, copy_context
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, cast

from ._celery_codec import (DEFAULT_MAX_STORE_BYTES, REQUEST_KEYS, decode, encode_store,
                            header_limit, join_header)
from ._celery_codec import task_id as _task_id
from ._storage import AsyncLocalStorage, named_storages
from ._ids import ID_RE as _ID_RE
from ._ids import id_of as _id_of
from ._ids import is_safe as _is_safe
from .wsgi import _OUTGOING, request_storage

__all__ = ["install", "is_installed", "task_storage", "HEADER"]

_log = logging.getLogger(__name__)

#: The store of a running task: ``{"task_id": ..., "parent_task_id": ...}``.
#:
#: .. versionadded:: 0.2
task_storage: AsyncLocalStorage[Dict[str, Optional[str]]] = AsyncLocalStorage(
    name="asl_gevent.celery.task")

#: The message header that carries the stores.
#:
#: .. versionadded:: 0.2
HEADER = "asl_gevent"

_lock = threading.Lock()
# The apps install() was called for (weakly: an app may be thrown away).
_apps: "weakref.WeakSet[Any]" = weakref.WeakSet()
_max_store_bytes = DEFAULT_MAX_STORE_BYTES
# Storages (by name) already warned about: one warning per storage.
_warned: set[str] = set()
# (module, original build_tracer) pairs we replaced.
_patched: List[Tuple[Any, Any]] = []
# In a running task: (task id, the stores it received as a header text or
# None, parent task id, the code object of the task's body or None). A retry
# and the task's continuations are published with these, not with whatever
# the body did to its stores, so they start as the task did.
_Running = Tuple[str, Optional[str], Optional[str], Any]
_running: ContextVar[_Running] = ContextVar("asl_gevent.celery.running")
# The code object of Celery's trace_task (the function build_tracer
# returns), found in build_tracer's constants: _in_body() looks for its frame.
_trace_code: Any = None


def install(celery_app: Any, *, max_store_bytes: int = 16384) -> None:
    """Carry stores into the tasks of *celery_app*; run each task in its own context.

    :param celery_app: a :class:`celery.Celery` application.
    :param max_store_bytes: the largest store (as UTF-8 JSON) that is sent; a
        larger one is left out with a warning. A worker reads headers of up
        to ``16 * max_store_bytes`` characters: give publishers and workers
        the same value (calling install() where the app is made does).
        Shared by every app in the process (Celery's publish signal does not
        say which app publishes).

    Idempotent. Call it where the app is made, before the worker starts.

    .. versionchanged:: 0.3
       *max_store_bytes* also bounds what a worker reads.

    :raises ImportError: if Celery is not installed (``pip install asl_gevent[celery]``).
    :raises TypeError: if *celery_app* is not a Celery app or *max_store_bytes*
        not an int; :raises ValueError: if *max_store_bytes* < 64.

    .. versionadded:: 0.2
    """
    try:
        from celery import Celery, signals
        import celery.app.trace as trace
    except ImportError:
        raise ImportError("asl_gevent.celery needs Celery: pip install 'asl_gevent[celery]'") from None
    if not isinstance(celery_app, Celery):
        raise TypeError(f"asl_gevent.celery.install() argument 'celery_app' must be a "
                        f"celery.Celery app, not {type(celery_app).__name__!r}; "
                        f"e.g. install(Celery('proj'))")
    if not isinstance(max_store_bytes, int) or isinstance(max_store_bytes, bool):
        raise TypeError(f"asl_gevent.celery.install() argument 'max_store_bytes' must be "
                        f"an int, not {type(max_store_bytes).__name__!r}")
    if max_store_bytes < 64:
        raise ValueError(f"asl_gevent.celery.install() argument 'max_store_bytes' must be "
                         f">= 64, not {max_store_bytes}")
    global _max_store_bytes, _trace_code
    with _lock:
        _max_store_bytes = max_store_bytes
        _apps.add(celery_app)
        signals.before_task_publish.connect(_on_publish, weak=False,
                                            dispatch_uid="asl_gevent.celery")
        if not _patched:
            original = trace.build_tracer
            _trace_code = _find_trace_code(original)
            ours = _wrap_build_tracer(original)
            _patched.append((trace, original))
            trace.build_tracer = ours
            # The worker's consumer imported the name itself; patch its copy
            # too if it is loaded (if not, it will import ours).
            consumer = sys.modules.get("celery.worker.consumer.consumer")
            if consumer is not None and getattr(consumer, "build_tracer", None) is original:
                _patched.append((consumer, original))
                setattr(consumer, "build_tracer", ours)
        # Tracers built before install() (a worker already set up).
        for task in list(celery_app.tasks.values()):
            tracer = getattr(task, "__trace__", None)
            if tracer is not None and not getattr(tracer, "_asl_gevent", False):
                task.__trace__ = _wrap_tracer(tracer, task)


def _find_trace_code(build_tracer: Any) -> Any:
    """The code object of the ``trace_task`` function *build_tracer* defines
    (through wrappers that set ``__wrapped__``), or ``None``."""
    for _ in range(10):
        code = getattr(build_tracer, "__code__", None)
        for const in getattr(code, "co_consts", ()):
            if getattr(const, "co_name", None) == "trace_task":
                return const
        build_tracer = getattr(build_tracer, "__wrapped__", None)
        if build_tracer is None:
            break
    return None


def is_installed(celery_app: Any) -> bool:
    """Whether :func:`install` was called for *celery_app*.

    :param celery_app: any object; the answer is ``False`` for anything that
        is not an app :func:`install` was called for. Never raises.

    .. versionadded:: 0.2
    """
    return celery_app in _apps


# -- publishing ------------------------------------------------------------------

def _on_publish(sender: Any = None, headers: Optional[Dict[str, Any]] = None,
                **kwargs: Any) -> None:
    """``before_task_publish``: put the current stores into the message headers."""
    if headers is None:  # protocol 1 (Celery 3): no headers to carry them
        return
    try:
        payload: Optional[str]
        running = _running.get(None)
        if running is None:
            payload = _payload()
        elif headers.get("id") == running[0]:
            payload = _retry_payload(running)
        elif running[3] is not None and not _in_body(running[3]):
            # Celery publishes a continuation (chain link, link/link_error
            # callback, chord body) after the body returned, in the task's
            # context: it carries what the task received, not what its
            # body set.
            payload = running[1]
        else:
            payload = _payload()
    except Exception:  # never fail a publish because of us
        _log.exception("asl_gevent.celery: could not encode the stores; sending none")
        payload = None
    if payload is None:
        headers.pop(HEADER, None)  # a copied header must not carry stale stores
    else:
        headers[HEADER] = payload


def _payload() -> Optional[str]:
    """The current stores as one JSON text, or ``None`` when there are none.

    Each store is encoded alone within ``max_store_bytes`` (see
    :func:`~asl_gevent._celery_codec.encode_store`): one that cannot travel
    is left out with one warning per storage, and the rest still go.
    """
    limit = _max_store_bytes
    # Room left in the header: a worker reads at most header_limit() characters.
    room = header_limit(limit) - 16
    request_text: Optional[str] = None
    # The request's store: from the storage of the middleware serving this
    # request when it is not request_storage (RequestContextMiddleware(app,
    # storage=...) says so in _OUTGOING, as for asl_gevent.http), else from
    # request_storage. It is restored into request_storage in the worker.
    middleware = _OUTGOING.get(None)
    source = request_storage if middleware is None else middleware[0]
    store = source.get_store()
    if store is not None and store is not source.default:
        request_id = _id_of(store)
        if request_id is None or _ID_RE.fullmatch(request_id) is None:
            _warn_once("\0request:invalid", "not sending the request store to Celery tasks: its "
                       "request_id %.80r is not a valid X-Request-ID, so workers would "
                       "drop it; warned once", request_id)
        else:
            text, why = encode_store(store, limit)
            if text is None:
                # The ids alone: what a worker needs, and always encodable.
                ids = {"request_id": request_id}
                client_id = _client_id_of(store)
                if client_id is not None:
                    ids["client_request_id"] = client_id
                _warn_once("\0request:unencodable", "sending only the ids of the request store "
                           "to Celery tasks: %s; warned once", why)
                text = json.dumps(ids, separators=(",", ":"))
            request_text = text
            room -= len(request_text) + 5
    named: List[Tuple[str, str]] = []
    sent: Set[str] = set()
    for storage in named_storages():
        if storage is request_storage or storage is task_storage:
            continue
        store = storage.get_store()
        name = storage.name
        # Two storages may share a name: one store per name travels (the
        # worker restores it into every storage of that name).
        if store is None or store is storage.default or name in sent:
            continue
        text, why = encode_store(store, limit)
        if text is not None and len(text) + len(name) + 8 > room:
            text, why = None, (f"the header would be over {header_limit(limit)} "
                               f"characters (16 x max_store_bytes) with it")
        if text is None:
            _warn_once(name, "not sending the store of storage %r to Celery tasks: %s; "
                       "warned once per storage", name, why)
            continue
        sent.add(name)
        named.append((name, text))
        room -= len(text) + len(name) + 8
    return join_header(request_text, named)


def _client_id_of(store: Any) -> Optional[str]:
    """The store's ``client_request_id`` (key or attribute) if it passes the id rule."""
    if isinstance(store, Mapping):
        value = store.get(REQUEST_KEYS[1])
    else:
        value = getattr(store, REQUEST_KEYS[1], None)
    return value if _is_safe(value) else None


def _retry_payload(running: "_Running") -> str:
    """A retry: the stores the first attempt received, and its parent
    (Celery makes the retry's ``parent_id`` the task itself)."""
    received, parent = running[1], json.dumps(running[2])
    if received is None:
        return '{"p":' + parent + "}"
    return received[:-1] + ',"p":' + parent + "}"


def _received(decoded: Dict[str, Any]) -> Optional[str]:
    """The checked header as it came (without the retry's parent), encoded
    before the body runs: a body that changes a store in place changes
    nothing its continuations and retries carry."""
    return join_header(_dumps(decoded["r"]) if "r" in decoded else None,
                       [(name, _dumps(store)) for name, store in decoded.get("s", {}).items()])


def _dumps(value: Any) -> str:
    # Values a worker decoded (bounded, finite, no lone surrogates): does not fail.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _in_body(body: Any) -> bool:
    """Whether this publish comes from the running task's body (or what it
    calls), rather than from Celery's tracer around it.

    Celery publishes continuations from ``trace_task`` itself after ``fun``
    (the task's ``run`` or custom ``__call__``) returned: chain links and
    ``link`` callbacks from ``trace_task``/``_dispatch_callbacks_and_chain``,
    chord bodies from ``backend.mark_as_done``, ``link_error`` callbacks from
    ``on_error``. So: find the innermost ``trace_task`` frame on this stack
    and look at the frame it called. No ``trace_task`` frame (a greenlet or
    thread the body started) means the body.
    """
    frame = sys._getframe(2)
    for _ in range(200):  # bounded: Celery's stack above a publish is ~20 frames
        caller = frame.f_back
        if caller is None:
            return True
        if caller.f_code is _trace_code:
            return frame.f_code is body
        frame = caller
    return True


def _warn_once(name: str, message: str, *args: Any) -> None:
    if name not in _warned:
        _warned.add(name)
        _log.warning(message, *args)


# -- running ---------------------------------------------------------------------

def _wrap_build_tracer(original: Callable[..., Any]) -> Callable[..., Any]:
    def build_tracer(name: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
        tracer = original(name, task, *args, **kwargs)
        app = kwargs.get("app") or getattr(task, "_app", None)
        if app is not None and app in _apps:
            return _wrap_tracer(tracer, task)
        return tracer

    build_tracer.__wrapped__ = original  # type: ignore[attr-defined]
    build_tracer.__doc__ = original.__doc__
    return build_tracer


def _body_code(task: Any) -> Any:
    """The code object of the frame ``trace_task`` calls for the body: what
    ``build_tracer`` calls ``fun`` (the task's custom ``__call__``, else its
    ``run``); ``None`` if it has none (then every publish counts as the body's)."""
    try:
        import celery.app.trace as trace
        if trace.task_has_custom(task, "__call__"):
            target: Any = type(task).__call__
        else:
            target = task.run
        target = getattr(target, "__func__", target)
        return getattr(target, "__code__", None)
    except Exception:
        return None


def _wrap_tracer(tracer: Callable[..., Any], task: Any = None) -> Callable[..., Any]:
    body = _body_code(task) if task is not None and _trace_code is not None else None

    def trace_task(uuid: str, args: Any, kwargs: Any, request: Any = None,
                   *rest: Any, **options: Any) -> Any:
        # Context.run on a fresh copy per task, never a token reset
        # (gevent#1930): on solo/prefork every task runs on one thread, on
        # the threads and gevent pools workers are reused.
        return copy_context().run(_run_task, tracer, body, uuid, args, kwargs, request,
                                  rest, options)

    trace_task._asl_gevent = True  # type: ignore[attr-defined]
    trace_task.__wrapped__ = tracer  # type: ignore[attr-defined]
    return trace_task


def _run_task(tracer: Callable[..., Any], body: Any, uuid: str, args: Any, kwargs: Any,
              request: Any, rest: Tuple[Any, ...], options: Dict[str, Any]) -> Any:
    get = request.get if isinstance(request, Mapping) else (lambda key, default=None: default)
    # The message's id and parent_id are broker input too, and reach log
    # lines through StoreFilter(task_storage): one rule for both (a failing
    # one is None in task_storage; the task still runs under its id).
    parent = _task_id(get("parent_id"))
    received = None
    eager = get("is_eager")
    if not eager:
        # A worker: start from the worker's own context with only the
        # message's stores (a task published outside a request gets none).
        request_storage.enter_with(cast(Any, None))
        header = get(HEADER)
        if header is not None:
            decoded = decode(header, _max_store_bytes)
            if decoded is not None:
                try:
                    received = _received(decoded)
                except Exception:  # decoded values re-encode; never lose a task
                    _log.exception("asl_gevent.celery: could not re-encode the received "
                                   "stores; continuations carry none")
                _restore(decoded)
                if "p" in decoded:
                    parent = decoded["p"]  # a retry: the first attempt's parent
    # Eager tasks run in a copy of the caller's context: their continuations
    # carry the caller's stores as before (body None).
    _running.set((uuid, received, parent, None if eager else body))
    task_storage.enter_with({"task_id": _task_id(uuid), "parent_task_id": parent})
    return tracer(uuid, args, kwargs, request, *rest, **options)


def _restore(decoded: Dict[str, Any]) -> None:
    """Enter the stores of a message's (checked) header."""
    if "r" in decoded:
        request_storage.enter_with(decoded["r"])
    named = decoded.get("s")
    if named:
        by_name: Dict[str, List[AsyncLocalStorage[Any]]] = {}
        for storage in named_storages():
            if storage is not task_storage and storage is not request_storage:
                by_name.setdefault(storage.name, []).append(storage)
        for name, store in named.items():
            targets = by_name.get(name)
            if not targets:
                _log.debug("asl_gevent.celery: no storage named %r here; store dropped", name)
                continue
            for storage in targets:
                storage.enter_with(store)
