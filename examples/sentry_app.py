"""Sentry: tags set in a request reach events captured in greenlets it spawned.

sentry-sdk 2.x keeps its scopes in ``contextvars``; the hooks copy the context
into spawned greenlets, so an event captured there carries the request's
tags. Sentry's background sender starts *detached* (asl_gevent marks its
starter), so it never holds a request's stores. No network: the events go
to a transport that keeps them in a list.

    $ python examples/sentry_app.py
    'payment failed' request_id=req-1
    'payment failed' request_id=req-2
"""

import gevent
import sentry_sdk
from sentry_sdk.transport import Transport

import asl_gevent
from asl_gevent.wsgi import get_request_id, request_storage

events = []


class KeepEvents(Transport):
    """Stands for Sentry's HTTP transport: keeps the events here."""

    def capture_envelope(self, envelope):  # type: ignore[no-untyped-def]
        event = envelope.get_event()
        if event is not None:
            events.append(event)


asl_gevent.install()  # before sentry_sdk.init(): its sender then starts detached
sentry_sdk.init(dsn="https://key@sentry.invalid/1", transport=KeepEvents,
                default_integrations=False)


def charge() -> None:
    sentry_sdk.capture_message("payment failed")      # in a spawned greenlet


def handler() -> None:
    # In a web app, do this once per request (a middleware, a before_request):
    sentry_sdk.set_tag("request_id", get_request_id())
    gevent.spawn(charge).join()


if __name__ == "__main__":
    for n in (1, 2):
        with sentry_sdk.isolation_scope():   # what Sentry's web integrations do per request
            request_storage.run({"request_id": f"req-{n}"}, handler)
    sentry_sdk.flush(timeout=5)
    for event in events:
        print(repr(event["message"]), "request_id=" + event["tags"]["request_id"])
    assert [e["tags"]["request_id"] for e in events] == ["req-1", "req-2"], events
