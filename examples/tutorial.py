"""The tutorial's app: two gevent services, one request id on every log line.

``front`` handles ``GET /order/<n>``: it logs, spawns a greenlet that calls the
``stock`` service over HTTP, and answers. Nobody passes the id by hand; every
line of both services carries it, and the stock service receives it in the
``X-Request-ID`` header::

    $ python examples/tutorial.py
    front [req-1] GET /order/1
    front [req-1] asking the stock service
    stock [req-1] GET /stock/1
    front [req-1] stock says: 1 in stock
    ...
    front [-] done

(Requests run concurrently: the order of the lines varies.)
"""

# step 1: patch first, as gevent programs (and gunicorn's gevent workers) do
from gevent import monkey

monkey.patch_all()

# step 2: log the request id on every line
import logging  # noqa: E402
import sys  # noqa: E402

from asl_gevent.logfilter import StoreFilter  # noqa: E402


def make_logger(name: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(StoreFilter())                 # record.request_id, "-" outside
    handler.setFormatter(logging.Formatter(f"{name} [%(request_id)s] %(message)s"))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


front_log = make_logger("front")
stock_log = make_logger("stock")
# end step 2

# step 3: one store per request
from gevent.pywsgi import WSGIServer  # noqa: E402

from asl_gevent.wsgi import RequestContextMiddleware  # noqa: E402


def stock(environ, start_response):  # type: ignore[no-untyped-def]
    stock_log.info("GET %s", environ["PATH_INFO"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"1 in stock"]


stock_server = WSGIServer(("127.0.0.1", 0), RequestContextMiddleware(stock), log=None)
stock_server.start()
STOCK = f"http://127.0.0.1:{stock_server.server_port}"
# end step 3

# step 4: a greenlet that calls another service keeps the id
import gevent  # noqa: E402
import requests  # noqa: E402

import asl_gevent.http  # noqa: E402

asl_gevent.http.install()   # outgoing requests/urllib3 calls carry X-Request-ID


def ask_stock(n: str) -> str:
    front_log.info("asking the stock service")
    return requests.get(f"{STOCK}/stock/{n}", timeout=5).text


def front(environ, start_response):  # type: ignore[no-untyped-def]
    front_log.info("GET %s", environ["PATH_INFO"])
    n = environ["PATH_INFO"].rsplit("/", 1)[-1]
    answer = gevent.spawn(ask_stock, n).get()        # the child was passed no id
    front_log.info("stock says: %s", answer)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [answer.encode()]


front_server = WSGIServer(("127.0.0.1", 0), RequestContextMiddleware(front), log=None)
front_server.start()
# end step 4

# step 5: send three concurrent requests, each with its own id
clients = [gevent.spawn(requests.get, f"http://127.0.0.1:{front_server.server_port}/order/{n}",
                        headers={"X-Request-ID": f"req-{n}"}, timeout=5)
           for n in (1, 2, 3)]
gevent.joinall(clients, raise_error=True)
front_server.stop()
stock_server.stop()
front_log.info("done")
# end step 5
