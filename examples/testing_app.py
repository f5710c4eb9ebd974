"""Testing your app: does the request id reach the work your code spawns?

A pytest file (run it with ``python -m pytest examples/testing_app.py``, or
as a script). Record what the spawned code saw and assert in the test:
gevent's hub only *prints* an assert that fails inside a greenlet.

    $ python examples/testing_app.py
    ...
    4 passed in 0.52s
"""

import gevent
import pytest
from werkzeug.test import Client

import asl_gevent
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_storage

seen = []


def my_app(environ, start_response):  # type: ignore[no-untyped-def]
    """Stands for your WSGI app (a Flask app: wrap ``app.wsgi_app``)."""
    gevent.spawn(lambda: seen.append(get_request_id())).join()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    seen.clear()
    return Client(RequestContextMiddleware(my_app))


def test_spawned_work_sees_the_request_id(client):  # type: ignore[no-untyped-def]
    response = client.get("/", headers={"X-Request-ID": "test-1"})
    assert (seen, response.headers["X-Request-ID"]) == (["test-1"], "test-1")


def test_concurrent_requests_never_mix(client):  # type: ignore[no-untyped-def]
    ids = [f"test-{n}" for n in range(50)]
    gevent.joinall([gevent.spawn(client.get, "/", headers={"X-Request-ID": i}) for i in ids])
    assert sorted(seen) == sorted(ids)


@pytest.fixture
def hooks_off():  # type: ignore[no-untyped-def]
    """The negative control: plain gevent. Puts the hooks back only if they were on."""
    was_installed = asl_gevent.is_installed()
    asl_gevent.uninstall()
    try:
        yield
    finally:
        if was_installed:
            asl_gevent.install()


def test_without_the_hooks_the_greenlet_starts_empty(client, hooks_off):  # type: ignore[no-untyped-def]
    client.get("/", headers={"X-Request-ID": "test-3"})
    assert seen == [None]


def test_code_without_the_middleware_runs_in_a_store_of_your_own():  # type: ignore[no-untyped-def]
    assert request_storage.run({"request_id": "test-2"},
                               lambda: gevent.spawn(get_request_id).get()) == "test-2"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
