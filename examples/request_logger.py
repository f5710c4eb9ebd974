"""Node's AsyncLocalStorage request logger, on gevent.pywsgi.

The example from Node's documentation, line for line: every request gets the
next id with ``als.run(id, ...)``, logs ``start``, and starts work that logs
``finish`` later (Node's ``setImmediate``; here a spawned greenlet). The id
reaches the spawned greenlet without being passed to it::

    $ python examples/request_logger.py
    0: start
    1: start
    0: finish
    1: finish

The script serves on 127.0.0.1 (an ephemeral port), sends ``--requests``
concurrent requests to itself, checks that every response carries its own
request's id, and exits (non-zero if anything was mixed up).
"""

from gevent import monkey

monkey.patch_all()  # a legacy-style app: the client below uses plain urllib

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import urllib.request  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from asl_gevent import AsyncLocalStorage  # noqa: E402

async_local_storage: AsyncLocalStorage[int] = AsyncLocalStorage(name="request-id")


def log_with_id(msg: str) -> None:
    request_id = async_local_storage.get_store()
    print(f"{request_id if request_id is not None else '-'}:", msg, flush=True)


id_seq = itertools.count()


def app(environ, start_response):  # type: ignore[no-untyped-def]
    def handle():  # type: ignore[no-untyped-def]
        log_with_id("start")
        # Imagine any chain of async operations here
        later = gevent.spawn_later(0.05, log_with_id, "finish")
        later.join()
        body = f"request {async_local_storage.get_store()}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return async_local_storage.run(next(id_seq), handle)


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2,
                        help="concurrent requests to send (default: 2)")
    options = parser.parse_args(argv)

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        def fetch(_: int) -> str:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode().strip()

        clients = [gevent.spawn(fetch, n) for n in range(options.requests)]
        gevent.joinall(clients, timeout=30, raise_error=True)
        bodies = sorted(c.value for c in clients)
    finally:
        server.stop(timeout=1)

    expected = sorted(f"request {n}" for n in range(options.requests))
    if bodies != expected:
        print(f"MISMATCH: responses {bodies}, expected {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
