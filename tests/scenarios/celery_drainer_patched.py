"""Patched scenario for tests/test_celery.py (run as a subprocess).

A gevent web process (monkey-patched, RequestContextMiddleware with the leak
watch on) whose every request waits for a Celery result: ``probe.delay().get()``
on the Redis result backend (ASL_TEST_BROKER; a real worker runs the task).
Celery starts its result drainer greenlet (``greenletDrainer.run``) lazily,
inside the request that first calls ``.get()`` -- and, as its backend sits in a
``threading.local`` that is per greenlet under monkey-patching, once per
request greenlet -- and the drainer never ends. Started attached, it would hold
that request's store for the life of the process.

Prints one JSON object: what each task saw, how many request stores are still
alive after the requests (weak references), and what the leak watch logged.
ASL_GEVENT_DETACH_KNOWN=0 in the environment is the negative control.
"""
from gevent import monkey
monkey.patch_all()

import gc
import json
import logging
import os
import sys
import urllib.request
import weakref

sys.path.insert(0, os.path.join(os.getcwd(), "tests"))

import gevent
from gevent.pywsgi import WSGIServer

import asl_gevent
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_id_from
from celery_app import app as celery_app

REQUESTS = 5

leaks = []


class ListHandler(logging.Handler):
    def emit(self, record):
        leaks.append(record.getMessage())


logging.getLogger("asl_gevent.leak").addHandler(ListHandler())


class Store(dict):
    """A dict store that a weak reference can watch."""


stores = []
seen = {}


def store_factory(environ):
    store = Store(request_id=request_id_from(environ))
    stores.append(weakref.ref(store))
    return store


def app(environ, start_response):
    request_id = get_request_id()
    result = celery_app.signature("probe", (request_id,)).delay().get(timeout=30)
    seen[request_id] = (result["label"], (result["request"] or {}).get("request_id"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [request_id.encode()]


server = WSGIServer(("127.0.0.1", 0),
                    RequestContextMiddleware(app, store_factory=store_factory, leak_watch=0.3),
                    log=None)
server.start()
try:
    for n in range(1, REQUESTS + 1):
        request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/",
                                         headers={"X-Request-ID": f"r{n}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.read() == f"r{n}".encode()
    gevent.sleep(1.0)  # the leak watch's delay (0.3 s) and then some
    for _ in range(3):
        gc.collect()
finally:
    server.stop(timeout=5)

print(json.dumps({
    "installed": asl_gevent.is_installed(),
    "seen": seen,
    "stores_made": len(stores),
    "stores_alive": sum(ref() is not None for ref in stores),
    "leaks": leaks,
}))
