"""A gevent.pywsgi server whose every log line carries its request id.

No gunicorn: the hooks alone give each request on ``gevent.pywsgi`` its own
copy of the server's context (also each request of a keep-alive
connection); the middleware makes the store with the id; ``StoreFilter``
prints it. A greenlet the handler spawns logs the same id.

    $ python examples/pywsgi_app.py
    [req-1] GET /
    [req-1] background: warming the cache
    [req-2] GET /
    [req-2] background: warming the cache
    [-] server stopped

Exits non-zero if a line carries another request's id.
"""

# -- the app (what you copy) ---------------------------------------------------

import logging
import socket
import sys

import gevent
from gevent.pywsgi import WSGIServer

from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import RequestContextMiddleware

handler = logging.StreamHandler(sys.stdout)
handler.addFilter(StoreFilter())
handler.setFormatter(logging.Formatter("[%(request_id)s] %(message)s"))
log = logging.getLogger("pywsgi_app")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False


def warm_cache() -> None:
    log.info("background: warming the cache")


def hello(environ, start_response):  # type: ignore[no-untyped-def]
    log.info("GET %s", environ["PATH_INFO"])
    gevent.spawn(warm_cache).join()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


app = RequestContextMiddleware(hello)


def serve(port: int = 0) -> WSGIServer:
    server = WSGIServer(("127.0.0.1", port), app, log=None)
    server.init_socket()  # the listening socket, made now so we can set an option
    # Accepted sockets inherit TCP_NODELAY: without it every keep-alive
    # response waits ~40 ms for the client's delayed ACK.
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.start()
    return server


# -- the script: serve, send two requests in order, stop ---------------------

if __name__ == "__main__":
    import urllib.request

    server = serve()
    for n in (1, 2):
        url = f"http://127.0.0.1:{server.server_port}/"
        request = urllib.request.Request(url, headers={"X-Request-ID": f"req-{n}"})
        # urllib is blocking and the server runs in this process's hub: fetch
        # from a real thread through gevent's thread pool.
        body = gevent.get_hub().threadpool.apply(
            lambda r: urllib.request.urlopen(r, timeout=5).read(), (request,))
        assert body == b"hello\n", body
    server.stop()
    log.info("server stopped")
