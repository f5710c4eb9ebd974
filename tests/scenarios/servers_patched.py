"""Patched scenario for tests/test_servers.py (run as a subprocess)."""
from gevent import monkey
monkey.patch_all()

import concurrent.futures, http.client, json, logging, threading, urllib.request
import gevent
from gevent.pywsgi import WSGIServer
import asl_gevent
from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id

EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=3)
records = []

class ListHandler(logging.Handler):
    def emit(self, record):
        records.append((record.getMessage(), record.request_id))

handler = ListHandler()
handler.addFilter(StoreFilter())
log = logging.getLogger("patched")
log.addHandler(handler)
log.setLevel(logging.INFO)

def observe(where, expected):
    log.info("%s %s", where, expected)
    return get_request_id()

def in_thread(expected):
    out = []
    thread = threading.Thread(target=lambda: out.append(observe("thread", expected)))
    thread.start()
    thread.join()
    return out[0]

def app(environ, start_response):
    rid = get_request_id()
    seen = {
        "app": rid,
        "spawn": gevent.spawn(observe, "spawn", rid).get(),
        "thread": in_thread(rid),
        "executor": EXECUTOR.submit(observe, "executor", rid).result(),
        "threadpool": gevent.get_hub().threadpool.spawn(observe, "threadpool", rid).get(),
    }
    gevent.sleep(0.001)
    seen["after"] = get_request_id()
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

server = WSGIServer(("127.0.0.1", 0), RequestContextMiddleware(app), log=None)
server.start()
port = server.server_port

def urllib_client(n):
    out = []
    for j in range(3):
        sent = "u%d-%d" % (n, j)
        request = urllib.request.Request("http://127.0.0.1:%d/" % port,
                                         headers={"X-Request-ID": sent})
        with urllib.request.urlopen(request, timeout=30) as response:
            out.append((sent, response.headers["X-Request-ID"], json.loads(response.read())))
    return out

def keep_alive_client(n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for j in range(3):
        sent = "k%d-%d" % (n, j)
        conn.request("GET", "/", headers={"X-Request-ID": sent})
        response = conn.getresponse()
        out.append((sent, response.getheader("X-Request-ID"), json.loads(response.read())))
    conn.close()
    return out

clients = [gevent.spawn(urllib_client, n) for n in range(10)]
clients += [gevent.spawn(keep_alive_client, n) for n in range(10)]
gevent.joinall(clients, timeout=60, raise_error=True)
server.stop(timeout=5)
print(json.dumps({
    "installed": asl_gevent.is_installed(),
    "finished": sum(g.successful() for g in clients),
    "results": [r for g in clients for r in g.get()],
    "records": records,
    "outside": get_request_id(),
}))
