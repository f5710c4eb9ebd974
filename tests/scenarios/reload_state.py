"""importlib.reload of asl_gevent modules that keep state (tests/test_install.py).

asl_gevent.http (what it patched), asl_gevent._detach (marked starters, the
companion, an active detached() block) and asl_gevent._storage (named
storages): after reloading the modules named in argv while everything is
installed, is_installed() tells the truth, uninstall() puts back exactly what
was there, and named storages are still found. Prints one JSON line.
"""
import importlib
import json
import logging.handlers
import sys

import gevent
import urllib3.connectionpool

listener_start = vars(logging.handlers.QueueListener)["start"]  # before any install

import asl_gevent
import asl_gevent._detach
import asl_gevent._hooks
import asl_gevent._storage
import asl_gevent.http

POOL = urllib3.connectionpool.HTTPConnectionPool
urlopen = vars(POOL)["urlopen"]
als = asl_gevent.AsyncLocalStorage(name="before-reload")
asl_gevent.install()
asl_gevent.http.install()
companions = len(asl_gevent._hooks._companions)
block = asl_gevent.detached()


def spawn_in_block_across_reload():
    block.__enter__()
    try:
        for name in sys.argv[1:]:
            importlib.reload(sys.modules[name])
        return gevent.spawn(als.get_store).get(timeout=5)
    finally:
        block.__exit__(None, None, None)


out = {"in_block": als.run("r1", spawn_in_block_across_reload),
       "after_block": als.run("r1", lambda: gevent.spawn(als.get_store).get(timeout=5))}
out["http_installed"] = asl_gevent.http.is_installed()
out["companions"] = len(asl_gevent._hooks._companions) - companions
out["named"] = "before-reload" in [s.name for s in asl_gevent._storage.named_storages()]
out["marked"] = bool(getattr(logging.handlers.QueueListener.start, "__asl_gevent_detached__", 0))
asl_gevent.http.uninstall()
asl_gevent.uninstall()
out["http_restored"] = (vars(POOL)["urlopen"] is urlopen, asl_gevent.http.is_installed())
out["starter_restored"] = vars(logging.handlers.QueueListener)["start"] is listener_start
asl_gevent.install()  # again: marks once, and uninstall() still puts back
asl_gevent.uninstall()
out["starter_restored_again"] = vars(logging.handlers.QueueListener)["start"] is listener_start
print(json.dumps(out))
