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
store. A store that :func:`json.dumps` refuses, or that is larger than
``max_store_bytes`` once encoded, is left out with one warning per storage;
the publish never fails because of it (for the request's store the bare
``{"request_id": ...}`` is sent instead).

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
store. A task that publishes tasks passes its stores on. Tasks run eagerly
(``apply()``, ``task_always_eager``) run in a copy of the caller's context.

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
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import weakref
from contextvars import ContextVar, copy_context
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, cast

from ._storage import AsyncLocalStorage, named_storages
from .wsgi import _OUTGOING, _id_of, request_storage

__all__ = ["install", "is_installed", "task_storage", "HEADER"]

_log = logging.getLogger(__name__)

#: The store of a running task: ``{"task_id": ..., "parent_task_id": ...}``.
task_storage: AsyncLocalStorage[Dict[str, Optional[str]]] = AsyncLocalStorage(
    name="asl_gevent.celery.task")

#: The message header that carries the stores.
HEADER = "asl_gevent"

_lock = threading.Lock()
# The apps install() was called for (weakly: an app may be thrown away).
_apps: "weakref.WeakSet[Any]" = weakref.WeakSet()
_max_store_bytes = 16384
# Storages (by name) already warned about: one warning per storage.
_warned: set[str] = set()
# (module, original build_tracer) pairs we replaced.
_patched: List[Tuple[Any, Any]] = []
# In a running task: (task id, its message's decoded header or None, parent
# task id). A retry is published with these, not with whatever the task did
# to its stores, so a retried task starts as the first attempt did.
_running: ContextVar[Tuple[str, Optional[Dict[str, Any]], Optional[str]]] = ContextVar(
    "asl_gevent.celery.running")


def install(celery_app: Any, *, max_store_bytes: int = 16384) -> None:
    """Carry stores into the tasks of *celery_app*; run each task in its own context.

    :param celery_app: a :class:`celery.Celery` application.
    :param max_store_bytes: the largest store (as JSON) that is sent; a larger
        one is left out with a warning. Shared by every app in the process
        (Celery's publish signal does not say which app publishes).

    Idempotent. Call it where the app is made, before the worker starts.

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
    global _max_store_bytes
    with _lock:
        _max_store_bytes = max_store_bytes
        _apps.add(celery_app)
        signals.before_task_publish.connect(_on_publish, weak=False,
                                            dispatch_uid="asl_gevent.celery")
        if not _patched:
            original = trace.build_tracer
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
                task.__trace__ = _wrap_tracer(tracer)


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
        if running is not None and headers.get("id") == running[0]:
            payload = _retry_payload(running)
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
    """The current stores as one JSON text, or ``None`` when there are none."""
    parts: List[str] = []
    # The request's store: from the storage of the middleware serving this
    # request when it is not request_storage (RequestContextMiddleware(app,
    # storage=...) says so in _OUTGOING, as for asl_gevent.http), else from
    # request_storage. It is restored into request_storage in the worker.
    middleware = _OUTGOING.get(None)
    source = request_storage if middleware is None else middleware[0]
    store = source.get_store()
    if store is not None and store is not source.default:
        text = _encode("request", store)
        if text is None:
            request_id = _id_of(store)
            if request_id is not None:
                text = json.dumps({"request_id": request_id})
        if text is not None:
            parts.append(f'"r":{text}')
    named: List[str] = []
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
        text = _encode(name, store)
        if text is not None:
            sent.add(name)
            named.append(f"{json.dumps(name)}:{text}")
    if named:
        parts.append('"s":{' + ",".join(named) + "}")
    if not parts:
        return None
    return "{" + ",".join(parts) + "}"


def _retry_payload(running: Tuple[str, Optional[Dict[str, Any]], Optional[str]]) -> str:
    """A retry: the first attempt's stores and parent (Celery makes the retry's
    ``parent_id`` the task itself)."""
    _, decoded, parent = running
    return json.dumps({**(decoded or {}), "p": parent}, separators=(",", ":"))


def _encode(name: str, store: Any) -> Optional[str]:
    try:
        text = json.dumps(store, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        _warn_once(name, "not sending the store of storage %r to Celery tasks: it is not "
                   "JSON-serialisable (%s); warned once per storage", name, exc)
        return None
    if len(text.encode()) > _max_store_bytes:
        _warn_once(name, "not sending the store of storage %r to Celery tasks: %d bytes "
                   "as JSON, over max_store_bytes=%d; warned once per storage",
                   name, len(text.encode()), _max_store_bytes)
        return None
    return text


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
            return _wrap_tracer(tracer)
        return tracer

    build_tracer.__wrapped__ = original  # type: ignore[attr-defined]
    build_tracer.__doc__ = original.__doc__
    return build_tracer


def _wrap_tracer(tracer: Callable[..., Any]) -> Callable[..., Any]:
    def trace_task(uuid: str, args: Any, kwargs: Any, request: Any = None,
                   *rest: Any, **options: Any) -> Any:
        # Context.run on a fresh copy per task, never a token reset
        # (gevent#1930): on solo/prefork every task runs on one thread, on
        # the threads and gevent pools workers are reused.
        return copy_context().run(_run_task, tracer, uuid, args, kwargs, request, rest, options)

    trace_task._asl_gevent = True  # type: ignore[attr-defined]
    trace_task.__wrapped__ = tracer  # type: ignore[attr-defined]
    return trace_task


def _run_task(tracer: Callable[..., Any], uuid: str, args: Any, kwargs: Any, request: Any,
              rest: Tuple[Any, ...], options: Dict[str, Any]) -> Any:
    get = request.get if isinstance(request, Mapping) else (lambda key, default=None: default)
    parent = get("parent_id")
    decoded = None
    if not get("is_eager"):
        # A worker: start from the worker's own context with only the
        # message's stores (a task published outside a request gets none).
        request_storage.enter_with(cast(Any, None))
        payload = get(HEADER)
        if isinstance(payload, str):
            decoded = _restore(payload)
            if decoded is not None and "p" in decoded:
                parent = decoded["p"]  # a retry: the first attempt's parent
    _running.set((uuid, decoded, parent))
    task_storage.enter_with({"task_id": uuid, "parent_task_id": parent})
    return tracer(uuid, args, kwargs, request, *rest, **options)


def _restore(payload: str) -> Optional[Dict[str, Any]]:
    """Enter the stores of a message's header; return it decoded."""
    try:
        decoded = json.loads(payload)
    except ValueError:
        _log.warning("asl_gevent.celery: ignoring a malformed %r header", HEADER)
        return None
    if not isinstance(decoded, dict):
        return None
    if "r" in decoded:
        request_storage.enter_with(decoded["r"])
    named = decoded.get("s")
    if isinstance(named, dict) and named:
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
    return decoded
