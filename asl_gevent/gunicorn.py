"""gunicorn worker classes that run every request in its own context.

gunicorn's gevent worker serves all the requests of a keep-alive connection
in one greenlet, one after the other (``AsyncWorker.handle`` loops over
them). A greenlet has one :class:`contextvars.Context`, so whatever request 1
set -- ``als.enter_with(...)``, a ``ContextVar.set``, a structlog
``bind_contextvars``, an OpenTelemetry span left attached -- would still be
there for request 2 on the same connection. :class:`GeventWorker` runs each
request in a fresh *copy* of the connection greenlet's context instead, so
request 2 starts exactly where request 1 started, even if request 1 raised::

    gunicorn -k asl_gevent.gunicorn.GeventWorker -w 4 myapp:app

The worker also makes sure the propagation hooks are installed after
gunicorn's ``monkey.patch_all()`` (the gevent plugin entry point does that
too; the worker says it explicitly), so every greenlet, pool task and
thread-pool task a view starts carries the request's stores.
``pre_request`` and ``post_request`` server hooks run inside the request's
context as well: what ``pre_request`` sets, the app sees, and the next
request does not.

:class:`GeventPyWSGIWorker` is the same for gunicorn's ``gevent_pywsgi``
worker, whose keep-alive loop (``pywsgi.WSGIHandler.handle_one_request``)
the hooks already isolate. That worker serves requests through gevent's
pywsgi handler and never enters gunicorn's ``AsyncWorker.handle_request``, so
gunicorn never calls ``pre_request``/``post_request`` with it, with or
without this package (gunicorn 27.0.1); use :class:`GeventWorker` if you
need those hooks.

Keeping the stock worker
------------------------

With ``-k gevent`` the hooks still install themselves when the worker runs
``monkey.patch_all()``, but keep-alive requests share one context. Install the
hooks explicitly in a config file and give every request a fresh context with
:class:`asl_gevent.wsgi.RequestContextMiddleware`::

    # gunicorn_conf.py -- gunicorn -k gevent -c gunicorn_conf.py myapp:app
    import asl_gevent

    worker_class = "gevent"

    def post_worker_init(worker):
        # After gunicorn's monkey.patch_all(): hooks on the patched modules.
        asl_gevent.install()

    # myapp.py
    from flask import Flask
    from asl_gevent.wsgi import RequestContextMiddleware

    flask_app = Flask(__name__)     # your app, views and all
    app = RequestContextMiddleware(flask_app)

The middleware isolates what happens *inside* the app; with the stock worker
gunicorn's own ``pre_request``/``post_request`` hooks still share the
connection's context.

This module imports gunicorn; :mod:`asl_gevent` itself never imports it, so
gunicorn stays an optional dependency (``pip install asl_gevent[gunicorn]``).

.. versionadded:: 0.1
"""

from __future__ import annotations

from contextvars import copy_context
from typing import Any, Callable, Optional

from gunicorn.http import wsgi as gunicorn_http_wsgi
from gunicorn.workers import ggevent

from ._hooks import install
from ._watch import LeakWatch, _Request, leak_watch_delay, request_marker
from . import wsgi as _wsgi
from .wsgi import _FRESH_CONTEXT

_wsgi._GUNICORN_RESPONSE[0] = gunicorn_http_wsgi.Response
_base_handle_request = ggevent.GeventWorker.handle_request

__all__ = ["GeventWorker", "GeventPyWSGIWorker"]


class GeventWorker(ggevent.GeventWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's gevent worker, one context per request.

    Use as ``gunicorn -k asl_gevent.gunicorn.GeventWorker``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 the :attr:`leak_watch` attribute.
    """

    #: Seconds after which a store a request left in a live greenlet or
    #: patched thread is logged (``asl_gevent.leak``, once per holder).
    #: ``None`` reads ``ASL_GEVENT_LEAK_WATCH`` (``gunicorn -e
    #: ASL_GEVENT_LEAK_WATCH=5``), ``0`` is off; or set it in a subclass.
    #: :class:`GeventPyWSGIWorker` reads it the same way. The watch reports
    #: only stores: the worker makes none, so it needs the middleware or
    #: stores the app sets itself.
    leak_watch: Optional[float] = None
    _leak_watch: Optional[LeakWatch] = None

    def patch(self) -> None:
        """Monkey-patch (gunicorn), then install the propagation hooks.

        ``install()`` is idempotent: if the plugin entry point or an import
        already installed them, this costs nothing.
        """
        super().patch()
        install()
        delay = leak_watch_delay(self.leak_watch, f"{type(self).__name__}.leak_watch")
        self._leak_watch = LeakWatch(delay) if delay is not None else None

    def handle(self, listener: Any, client: Any, addr: Any) -> Any:
        """Serve one connection (gunicorn's loop), marked for the middleware.

        The mark, set once per connection in the connection greenlet's own
        context, tells :class:`~asl_gevent.wsgi.RequestContextMiddleware`
        that each request there runs in a fresh copy made by this worker, so
        it need not make a second one.

        .. versionadded:: 0.3
        """
        _FRESH_CONTEXT.set(True)
        return super().handle(listener, client, addr)

    def _in_request_context(self, handle: Callable[..., Any], *args: Any) -> Any:
        context = copy_context()
        watch = self._leak_watch
        if watch is None:
            return context.run(handle, *args)
        marker = watch.begin(context)
        try:
            return context.run(handle, *args)
        finally:
            watch.end(marker)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        """Serve one HTTP/1 request in a copy of the connection's context.

        ``Context.run`` rather than a token reset: the copy is simply dropped
        afterwards, whatever the app set and however it ended (gevent#1930).
        A :class:`~asl_gevent.wsgi.RequestContextMiddleware` serving the
        request uses this copy instead of making a second one.

        .. versionchanged:: 0.3 the middleware reuses the worker's copy.
        """
        if self._leak_watch is None:  # the usual case: no extra frame per request
            # gunicorn's method called directly, not through super(): no
            # super object and bound method per request (~500 instructions).
            return copy_context().run(_base_handle_request, self, listener_name, req, sock, addr)
        return self._in_request_context(super().handle_request, listener_name, req, sock, addr)

    def handle_http2_request(self, listener_name: Any, req: Any, sock: Any, addr: Any,
                             h2_conn: Any) -> Any:
        """Serve one HTTP/2 stream in a copy of the connection's context.

        gunicorn (>= 24) serves the streams of an HTTP/2 connection one after
        the other in the connection's greenlet, like keep-alive requests.
        """
        return self._in_request_context(super().handle_http2_request,
                                        listener_name, req, sock, addr, h2_conn)


class GeventPyWSGIWorker(GeventWorker, ggevent.GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's ``gevent_pywsgi`` worker with the hooks installed.

    Requests are served by :mod:`gevent.pywsgi`, whose per-request method the
    hooks already run in a copy of the connection's context. gunicorn calls
    no ``pre_request``/``post_request`` hooks with this worker (it bypasses
    gunicorn's request loop), stock or ours.

    The :attr:`~GeventWorker.leak_watch` attribute and
    ``ASL_GEVENT_LEAK_WATCH`` work as for :class:`GeventWorker`: each request
    pywsgi serves is watched.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 the leak watch.
    """

    def patch(self) -> None:
        super().patch()
        watch = self._leak_watch
        if watch is not None:
            # pywsgi's handler, not handle_request, serves each request here.
            base: type = getattr(self, "wsgi_handler")  # gunicorn is untyped
            self.wsgi_handler = type(base.__name__, (base,), {
                "handle_one_request": _watched_one_request(base, watch)})


def _watched_one_request(base: type, watch: LeakWatch) -> Callable[[Any], Any]:
    def handle_one_request(self: Any) -> Any:
        # The marker goes into the connection's context around one request;
        # the hooks run pywsgi's handle_one_request in a copy of it, which is
        # the request's context. Set and reset here, in one greenlet, with
        # the request served synchronously in between (never a reset in
        # another greenlet: gevent#1930). The response is written and closed
        # when handle_one_request returns: the request has ended.
        marker = _Request()
        token = request_marker.set(marker)
        try:
            return base.handle_one_request(self)  # type: ignore[attr-defined]
        finally:
            request_marker.reset(token)
            watch.end(marker)

    return handle_one_request
