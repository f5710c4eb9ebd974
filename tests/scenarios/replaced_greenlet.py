"""gevent.Greenlet replaced by a subclass, as ddtrace < 2 did (tests/test_install.py).

``argv``: ``before``/``after`` (replace it before or after ``import asl_gevent``),
``init``/``noinit`` (the subclass has an ``__init__`` of its own or not),
``patch``/``nopatch`` (``monkey.patch_all()``, whose plugin entry point installs
the hooks). Prints one JSON line: what each path saw in 20 concurrent requests.
"""
import json
import sys
import warnings

warnings.simplefilter("error")  # a warning from the plugin is a failure here

when, init, patch = sys.argv[1:4]

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.greenlet  # noqa: E402


def replace():
    base = gevent.greenlet.Greenlet
    if init == "init":
        class Traced(base):
            def __init__(self, *args, **kwargs):
                self.traced = True
                super().__init__(*args, **kwargs)
    else:
        class Traced(base):
            traced = True
    gevent.Greenlet = gevent.greenlet.Greenlet = Traced
    return Traced


if when == "before":
    Traced = replace()
if patch == "patch":
    from gevent import monkey
    monkey.patch_all()
import asl_gevent  # noqa: E402

if when == "after":
    Traced = replace()

als = asl_gevent.AsyncLocalStorage(name="replaced")


def linked(method, glet):
    box, done = [], gevent.event.Event()

    def callback(source):
        box.append(als.get_store())
        done.set()

    getattr(glet, method)(callback)
    glet.join(timeout=5)
    done.wait(timeout=5)
    return box[0] if box else "no callback"


def raw():
    box, done = [], gevent.event.Event()
    gevent.spawn_raw(lambda: (box.append(als.get_store()), done.set()))
    done.wait(timeout=5)
    return box[0] if box else "not run"


def request(n):
    started = Traced(als.get_store)
    started.start()
    return {
        "gevent.spawn": gevent.spawn(als.get_store).get(timeout=5),
        "Traced.spawn": Traced.spawn(als.get_store).get(timeout=5),
        "gevent.Greenlet.spawn": gevent.Greenlet.spawn(als.get_store).get(timeout=5),
        "Traced().start": started.get(timeout=5),
        "link": linked("link", Traced.spawn(gevent.sleep, 0.001)),
        "rawlink": linked("rawlink", Traced.spawn(gevent.sleep, 0.001)),
        "spawn_raw": raw(),
        "traced": type(started).__name__ == "Traced" and started.traced is True,
    }


greenlets = [als.run(f"r{n}", gevent.spawn, request, n) for n in range(20)]
gevent.joinall(greenlets, timeout=30, raise_error=True)
print(json.dumps({"installed": asl_gevent.is_installed(),
                  "seen": [g.value for g in greenlets]}))
