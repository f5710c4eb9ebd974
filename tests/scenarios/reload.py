"""importlib.reload of asl_gevent modules while the hooks are in (tests/test_install.py).

No hook may end up calling itself (a RecursionError), is_installed() keeps
telling the truth, and uninstall() still puts gevent back. Prints one JSON line.
"""
import concurrent.futures
import importlib
import json
import sys

import gevent
import gevent.event
import gevent.hub
import gevent.threadpool
from gevent.server import StreamServer

import asl_gevent
import asl_gevent._context
import asl_gevent._hooks
import asl_gevent._resource
import asl_gevent._storage
import asl_gevent.wsgi

GREENLET = asl_gevent._hooks.Greenlet


def attributes():
    return {
        "run": vars(GREENLET)["run"], "rawlink": vars(GREENLET)["rawlink"],
        "spawn_raw": (gevent.spawn_raw, gevent.hub.spawn_raw),
        "executor": (concurrent.futures.thread._WorkItem,
                     vars(concurrent.futures.ThreadPoolExecutor)["_adjust_thread_count"]),
        "threadpool": (gevent.threadpool.ThreadResult,
                       gevent.threadpool.ThreadPool._WorkerGreenlet._before_run_task),
        "server": vars(gevent.baseserver.BaseServer)["start"],
    }


asl_gevent.uninstall()  # asl_gevent.wsgi made a storage: installed
pristine = attributes()
asl_gevent.install()
for name in sys.argv[1:]:
    importlib.reload(sys.modules[name])
als = asl_gevent.AsyncLocalStorage(name="reloaded")
executor, pool = concurrent.futures.ThreadPoolExecutor(1), gevent.threadpool.ThreadPool(1)


def paths():
    box, done = [], gevent.event.Event()
    glet = gevent.spawn(gevent.sleep, 0.001)
    glet.link(lambda _: (box.append(als.get_store()), done.set()))
    raw = []
    gevent.spawn_raw(lambda: raw.append(als.get_store()))
    got = {
        "spawn": gevent.spawn(als.get_store).get(timeout=5),
        "link": done.wait(5) and box[0],
        "submit": executor.submit(als.get_store).result(timeout=5),
        "threadpool": pool.spawn(als.get_store).get(timeout=5),
    }
    gevent.sleep(0.01)
    got["spawn_raw"] = raw[0] if raw else None
    return got


seen = als.run("request", paths)
served = []
server = als.run("started", lambda: StreamServer(
    ("127.0.0.1", 0), lambda sock, addr: (served.append(als.get_store()), sock.close())))
als.run("started", server.start)
gevent.socket.create_connection(("127.0.0.1", server.server_port), timeout=5).recv(1)
server.stop()
seen["server"] = served
installed = asl_gevent.is_installed()
asl_gevent.uninstall()
print(json.dumps({"seen": seen, "installed": installed,
                  "uninstalled": not asl_gevent.is_installed(),
                  "pristine": attributes() == pristine}))
executor.shutdown()
