"""install()/uninstall() from several OS threads at once (tests/test_install.py).

Part 1: two threads make their first AsyncLocalStorage at the same moment;
each must return with every hook in place. Part 2: threads call install() and
uninstall() at random; afterwards gevent is fully hooked or exactly as it was,
and is_installed() says which. Bounded: ROUNDS rounds, real threads, a
5-second join timeout each. Prints one JSON line of everything that went wrong.
"""
import concurrent.futures
import concurrent.futures.thread
import json
import random
import sys
import threading

import gevent
import gevent.baseserver
import gevent.hub
import gevent.pywsgi
import gevent.threadpool
from gevent._abstract_linkable import AbstractLinkable
from gevent.greenlet import Greenlet

import asl_gevent
import asl_gevent._hooks as hooks

ROUNDS = int(sys.argv[1]) if sys.argv[1:] else 200
sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows


WORKER = gevent.threadpool.ThreadPool._WorkerGreenlet
SERVER = gevent.baseserver.BaseServer


def attributes():
    return [Greenlet.run, Greenlet.rawlink, gevent.spawn_raw, gevent.hub.spawn_raw,
            concurrent.futures.thread._WorkItem,
            concurrent.futures.ThreadPoolExecutor._adjust_thread_count, AbstractLinkable.rawlink,
            gevent.threadpool.ThreadResult, WORKER._before_run_task, WORKER._after_run_task,
            SERVER.start, SERVER.do_handle, SERVER.close,
            gevent.pywsgi.WSGIHandler.handle_one_request]


def forget_first_use():
    """Let the next AsyncLocalStorage() install again, as in a fresh process."""
    state = getattr(hooks, "_state", None)
    if state is not None:
        state.ever_installed = False
    else:  # asl_gevent 0.1
        hooks._ever_installed = False


def state():
    now = attributes()
    if all(a is not b for a, b in zip(now, PRISTINE)):
        return "hooked"
    if all(a is b for a, b in zip(now, PRISTINE)):
        return "pristine"
    return "partial"


def run_threads(targets):
    barrier = threading.Barrier(len(targets))
    threads = [threading.Thread(target=lambda t=t: (barrier.wait(5), t())) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    return not any(thread.is_alive() for thread in threads)


PRISTINE = (asl_gevent.uninstall(), attributes())[1]
problems = []
for round_ in range(ROUNDS):
    asl_gevent.uninstall()
    forget_first_use()
    seen = []

    def first_storage():
        asl_gevent.AsyncLocalStorage(name="first")
        seen.append(state())

    if not run_threads([first_storage, first_storage]):
        problems.append(f"round {round_}: a first storage hung")
    if seen != ["hooked", "hooked"]:
        problems.append(f"round {round_}: first storages returned with {seen}")

    ops = [random.choice((asl_gevent.install, asl_gevent.uninstall)) for _ in range(4)]
    if not run_threads(ops):
        problems.append(f"round {round_}: install/uninstall hung")
    expected = "hooked" if asl_gevent.is_installed() else "pristine"
    if state() != expected:
        problems.append(f"round {round_}: {state()} while is_installed() is "
                        f"{asl_gevent.is_installed()}")
print(json.dumps({"rounds": ROUNDS, "problems": problems[:10], "count": len(problems)}))
