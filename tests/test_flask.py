"""What the README says about Flask's ``request`` in spawned greenlets.

Flask keeps ``request`` in a contextvar, and the hooks copy the whole context
into spawned greenlets: a bare ``gevent.spawn`` from a view can read
``request`` (plain gevent cannot), and a greenlet that outlives the request
still sees the finished request. Copying what the work needs before spawning
is what the README recommends.
"""

from __future__ import annotations

from typing import Any, Dict, List

import gevent
import gevent.event
import pytest
from flask import Flask, has_request_context, request


def _app(seen: Dict[str, Any], later: List[gevent.Greenlet]) -> Flask:
    app = Flask("tests.test_flask")
    finished = gevent.event.Event()
    seen["finished"] = finished

    @app.post("/order/<int:n>")
    def order(n: int) -> str:
        def read_request() -> Any:
            try:
                return request.path
            except RuntimeError as exc:
                return f"RuntimeError: {exc}".splitlines()[0]

        def after_the_response(email: str) -> None:
            finished.wait(10)  # the response is done and the request popped
            seen["copied"] = email
            if has_request_context():
                seen["late"] = (request.path, request.form.get("email"))
            else:
                seen["late"] = None

        seen["spawned"] = gevent.spawn(read_request).get(timeout=10)
        later.append(gevent.spawn(after_the_response, request.form["email"]))
        return "ok"

    return app


def _order(number: int, email: str) -> Dict[str, Any]:
    """POST an order through the test client, let the greenlets it left behind
    finish after the response, and return what they saw."""
    seen: Dict[str, Any] = {}
    later: List[gevent.Greenlet] = []
    client = _app(seen, later).test_client()
    assert client.post(f"/order/{number}", data={"email": email}).status_code == 200
    seen["finished"].set()
    gevent.joinall(later, timeout=10, raise_error=True)
    return seen


def test_request_is_readable_in_spawned_greenlets_and_outlives_the_request() -> None:
    """With the hooks: a spawned greenlet reads ``request``; one that runs
    after the response still has a request context, the finished one; a value
    copied before spawning is simply an argument."""
    seen = _order(1, "a@example.org")
    assert seen["spawned"] == "/order/1"
    assert seen["late"] == ("/order/1", "a@example.org")
    assert seen["copied"] == "a@example.org"


@pytest.mark.usefixtures("no_hooks")
def test_without_the_hooks_a_spawned_greenlet_has_no_request() -> None:
    """Negative control: plain gevent gives the greenlet an empty context."""
    seen = _order(2, "b@example.org")
    assert seen["spawned"].startswith("RuntimeError: Working outside of request context")
    assert seen["copied"] == "b@example.org"  # the copied value needs no context
    assert seen["late"] is None


def test_flask_test_client_with_the_middleware_on_wsgi_app() -> None:
    """The README's "Testing your app" recipe for Flask: wrap ``app.wsgi_app``
    and the test client's requests get the middleware's store, which reaches
    a spawned greenlet, per request."""
    from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

    app = Flask("tests.test_flask")

    @app.get("/")
    def index() -> str:
        return str(gevent.spawn(get_request_id).get(timeout=10))

    app.wsgi_app = RequestContextMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    client = app.test_client()
    for n in range(3):
        response = client.get("/", headers={"X-Request-ID": f"flask-{n}"})
        assert (response.text, response.headers["X-Request-ID"]) == (f"flask-{n}", f"flask-{n}")
