"""Patched scenario for tests/test_load.py (run as a subprocess)."""
from gevent import monkey
monkey.patch_all()

import json, queue, random, threading, time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import gevent
from asl_gevent import AsyncLocalStorage, is_installed

A = AsyncLocalStorage(name="patched")
VAR = ContextVar("patched_var", default="var-unset")
EXECUTOR = ThreadPoolExecutor(max_workers=4)   # made at import, as apps do
JOBS = queue.Queue()
REQUESTS, TASKS = 40, 10
rng = random.Random(20240611)
DELAYS = [[rng.random() / 500 for _ in range(TASKS)] for _ in range(REQUESTS)]
wrong, counts = [], {}


def count(kind):
    counts[kind] = counts.get(kind, 0) + 1


def seen():
    return A.get_store(), VAR.get()


def queue_worker():
    """A hand-written worker: started once, during request 0, serving everyone."""
    while True:
        job = JOBS.get()
        if job is None:
            return
        fn, reply = job
        reply.put(fn())


def request(r):
    VAR.set(f"req-{r}-var")
    me = (f"req-{r}", f"req-{r}-var")
    if r == 0:
        threading.Thread(target=queue_worker, daemon=True).start()
    for t in range(TASKS):
        delay = DELAYS[r][t]
        box = []
        th = threading.Thread(target=lambda: (time.sleep(delay), box.append(seen())))
        th.start()
        timer = threading.Timer(delay, lambda: box.append(seen()))
        timer.start()
        future = EXECUTOR.submit(lambda: (time.sleep(delay), seen())[1])
        bound, unbound = queue.Queue(), queue.Queue()
        JOBS.put((AsyncLocalStorage.bind(seen), bound))
        JOBS.put((seen, unbound))
        th.join(10)
        timer.join(10)
        results = {"thread": box[0], "timer": box[1], "executor": future.result(10),
                   "queue+bind": bound.get(timeout=10)}
        for kind, got in results.items():
            count(kind)
            if got != me:
                wrong.append((r, kind, got))
        # Without bind, a job runs in the worker's own context: the one it
        # was started in (request 0), whoever queued it.
        got = unbound.get(timeout=10)
        count("queue unbound")
        if got != ("req-0", "req-0-var"):
            wrong.append((r, "queue unbound", got))


greenlets = [gevent.spawn(A.run, f"req-{r}", request, r) for r in range(REQUESTS)]
gevent.joinall(greenlets, timeout=60, raise_error=True)
JOBS.put(None)
outside = EXECUTOR.submit(seen).result(10)
EXECUTOR.shutdown(wait=True)
print(json.dumps({"installed": is_installed(), "done": all(g.dead for g in greenlets),
                  "wrong": wrong[:10], "n_wrong": len(wrong), "counts": counts,
                  "outside": list(outside), "main": list(seen())}))
