"""The plugin entry point cannot install the hooks (tests/test_install.py).

A class we must patch refuses it (a metaclass that freezes it): patch_all()
must still work, warn once naming why, and leave gevent exactly as it was.
"""
import concurrent.futures.thread
import json
import sys
import warnings

import gevent
import gevent.hub
import gevent.greenlet


class Frozen(type):
    def __setattr__(cls, name, value):
        raise RuntimeError(f"{cls.__name__} is frozen")


class FrozenExecutor(concurrent.futures.thread.ThreadPoolExecutor, metaclass=Frozen):
    pass


concurrent.futures.thread.ThreadPoolExecutor = FrozenExecutor
GREENLET = gevent.greenlet.Greenlet


def attributes():
    return [id(vars(GREENLET)["run"]), id(vars(GREENLET)["rawlink"]),
            id(gevent.spawn_raw), id(gevent.hub.spawn_raw),
            id(concurrent.futures.thread._WorkItem), "_adjust_thread_count" in vars(FrozenExecutor)]


pristine = attributes()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from gevent import monkey
    monkey.patch_all()
    import asl_gevent
    als = asl_gevent.AsyncLocalStorage(name="after failure")  # retries, does not warn again
    seen = als.run("request", lambda: gevent.spawn(als.get_store).get(timeout=5))
print(json.dumps({
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "untouched": attributes() == pristine,
    "installed": asl_gevent.is_installed(),
    "seen": seen,
    "finder_left": any(getattr(f, "__asl_gevent_finder__", False) for f in sys.meta_path),
}))
