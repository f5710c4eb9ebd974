"""Django on a real gunicorn ``GeventWorker``, and Django's test Client.

The project is ``examples/django_app`` (``mysite``): its ``wsgi.py`` wraps
Django's WSGI application in :class:`asl_gevent.wsgi.RequestContextMiddleware`,
its ``LOGGING`` puts :class:`asl_gevent.logfilter.StoreFilter` on its one
handler (``[%(request_id)s] %(name)s: %(message)s``), handlers of Django's
``request_started``/``request_finished`` signals log, and its views log, spawn
greenlets and pool tasks, fail, and send a file.

gunicorn runs through :func:`test_gunicorn.gunicorn` (stopped by pid); the
clients are greenlets in this process on :class:`test_gunicorn.HTTPConnection`.
The test Client runs in a fresh interpreter (Django's settings are process
global), and so does the example's own test suite (``manage.py test``).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import gevent
import pytest

from helpers import ROOT, run_python
from test_gunicorn import WORKER, HTTPConnection, gunicorn

PROJECT = ROOT / "examples" / "django_app"
WRAPPED_APP = "mysite.wsgi:application"
# Django's own WSGI application, unwrapped (gunicorn calls the factory).
DJANGO_APP = "django.core.wsgi:get_wsgi_application()"
BARE_SETTINGS = "django_bare_settings"  # tests/django_bare_settings.py

STARTED = "mysite.signals: request started: GET {path}"
FINISHED = "mysite.signals: request finished"
# Every line each request logs (besides the traceback of /boom's error).
LINES = {
    "/work": [STARTED, "mysite.views: view: working", "mysite.views: greenlet: loading the profile",
              "mysite.views: pool task: rendering",
              "mysite.views: after the response: sending the audit event", FINISHED],
    "/missing": [STARTED, "django.request: Not Found: /missing", FINISHED],
    "/boom": [STARTED, "mysite.views: view: about to fail",
              "django.request: Internal Server Error: /boom", FINISHED],
    "/download": [STARTED, "mysite.views: view: download", FINISHED],
}
STATUS = {"/work": 200, "/missing": 404, "/boom": 500, "/download": 200}
PATHS = ("/work", "/missing", "/work", "/boom", "/download")
LINE_RE = re.compile(r"\[(?P<id>[^\]\s]+)\] (?P<line>(?:mysite|django)[\w.]*: .+)")
GENERATED_RE = re.compile(r"[0-9a-f]{32}")


@contextlib.contextmanager
def served(tmp_path: Path, app: str, settings: str = "mysite.settings") -> Iterator[int]:
    """The example project under gunicorn with the GeventWorker (2 workers)."""
    with pytest.MonkeyPatch.context() as patch:
        # gunicorn() puts the repository and tests/ on the path, plus ours.
        patch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])))
        with gunicorn(tmp_path, worker=WORKER, app=app,
                      env={"DJANGO_SETTINGS_MODULE": settings}) as port:
            yield port
            gevent.sleep(0.5)  # the greenlets /work leaves behind log after the response


Record = Tuple[str, Optional[str], int, Dict[str, str], bytes]


def traffic(port: int, clients: int, per_client: int) -> List[Record]:
    """*clients* concurrent client greenlets, *per_client* requests each over
    PATHS; even clients keep their connection alive, odd ones open one per
    request; every other request sends its own X-Request-ID."""
    records: List[Record] = []

    def client(k: int) -> None:
        conn: Optional[HTTPConnection] = None
        try:
            for j in range(per_client):
                path = PATHS[(k + j) % len(PATHS)]
                sent = f"dj-{k}-{j}-{uuid.uuid4().hex[:8]}" if (k + j) % 2 == 0 else None
                if conn is None:
                    conn = HTTPConnection(port)
                status, headers, body = conn.request(
                    path, {"X-Request-ID": sent} if sent else {}, close=k % 2 == 1)
                records.append((path, sent, status, headers, body))
                if k % 2 == 1 or headers.get("connection", "").lower() == "close":
                    conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()

    greenlets = [gevent.spawn(client, k) for k in range(clients)]
    with gevent.Timeout(60, AssertionError("the requests did not finish in 60 s")):
        gevent.joinall(greenlets, raise_error=True)
    assert len(records) == clients * per_client
    return records


def logged(tmp_path: Path) -> Counter[Tuple[str, str]]:
    """``(id, "logger: message")`` of every log line the workers wrote, but
    for the readiness probe's (``/peek``, sent with the id ``ready``, or with
    no id where it gets none)."""
    lines: Counter[Tuple[str, str]] = Counter()
    for text in (tmp_path / "gunicorn.out").read_text(errors="replace").splitlines():
        match = LINE_RE.fullmatch(text)
        if match is not None and match["id"] != "ready":
            lines[match["id"], match["line"]] += 1
    probes = lines.pop(("-", STARTED.format(path="/peek")), 0)
    if probes:
        lines["-", FINISHED] -= probes
        lines += Counter()  # drop what fell to zero
    return lines


def expected_lines(records: List[Record],
                   carries_id: Callable[[str], bool]) -> Counter[Tuple[str, str]]:
    """What the requests in *records* should have logged: each line with the
    request's id where ``carries_id(line)``, else with ``-``."""
    lines: Counter[Tuple[str, str]] = Counter()
    for path, sent, _, headers, _ in records:
        request_id = sent or headers.get("x-request-id") or "-"
        for line in LINES[path]:
            line = line.format(path=path)
            lines[request_id if carries_id(line) else "-", line] += 1
    return lines


def check_bodies(records: List[Record], with_ids: bool) -> List[Any]:
    """The requests whose status, echoed id or body is not what it should be."""
    bad: List[Any] = []
    for path, sent, status, headers, body in records:
        echoed = headers.get("x-request-id")
        if with_ids:
            request_id = sent or echoed
            if echoed != request_id or (sent is None and not GENERATED_RE.fullmatch(echoed or "")):
                bad.append((path, sent, "echoed", echoed))
        else:
            request_id = None
            if echoed is not None:
                bad.append((path, sent, "echoed", echoed))
        if status != STATUS[path]:
            bad.append((path, sent, status))
        elif path == "/work" and json.loads(body) != dict.fromkeys(
                ("view", "greenlet", "pool"), request_id):
            bad.append((path, sent, json.loads(body)))
        elif path == "/download" and body != b"report\n":
            bad.append((path, sent, body))
    return bad


# -- a real gunicorn GeventWorker ----------------------------------------------


@pytest.mark.slow
def test_wrapped_django_app_every_request_and_log_line_carries_its_own_id(
        tmp_path: Path) -> None:
    """1,000 requests from 50 concurrent clients through the wrapped WSGI
    application: every response echoes its id (the one sent, or a generated
    one, all distinct), the view, its greenlet and its pool task see it, and
    every line each request logs carries it: its ``request_started`` and
    ``request_finished`` handlers (the latter runs in the response's
    ``close()``, the file wrapper's for a FileResponse), the view, the
    greenlets it spawned (one of them after the response), and Django's own
    ``django.request`` lines for the 404 and the 500. 0 wrong, 0 missing."""
    with served(tmp_path, WRAPPED_APP) as port:
        records = traffic(port, clients=50, per_client=20)

    assert check_bodies(records, with_ids=True) == []
    ids = [sent or headers["x-request-id"] for _, sent, _, headers, _ in records]
    assert len(set(ids)) == len(records)
    assert sum(sent is None for _, sent, *_ in records) == len(records) // 2
    expected = expected_lines(records, lambda line: True)
    assert ("-" not in {request_id for request_id, _ in expected})
    assert logged(tmp_path) == expected


@pytest.mark.parametrize("app, settings, carries_id", [
    (DJANGO_APP, BARE_SETTINGS, lambda line: False),
    (DJANGO_APP, "mysite.settings",
     lambda line: line.startswith("mysite.views:") or "Internal Server Error" in line),
], ids=["unwrapped-no-middleware", "unwrapped-django-middleware-only"])
def test_without_the_wsgi_middleware_ids_are_missing(
        tmp_path: Path, app: str, settings: str, carries_id: Callable[[str], bool]) -> None:
    """Negative controls on the same worker class. Django's own WSGI
    application without our Django middleware: no id anywhere, no echo. With
    only ``asl_gevent.django.RequestIdMiddleware``: the view, its greenlets
    and the 500's log line have the id, but the signal handlers and Django's
    ``Not Found`` line run outside the middleware chain and have none; only
    wrapping the WSGI application covers them."""
    with_ids = settings == "mysite.settings"
    with served(tmp_path, app, settings) as port:
        records = traffic(port, clients=4, per_client=5)

    assert check_bodies(records, with_ids=with_ids) == []
    assert logged(tmp_path) == expected_lines(records, carries_id)


# -- Django's test Client ------------------------------------------------------

CLIENT_SCRIPT = """
import json, os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = sys.argv[1]
import django
django.setup()
import gevent
from django.test import Client
from asl_gevent.wsgi import get_request_id, request_storage

client = Client(raise_request_exception=False)
out = []
def note(name, response):
    out.append([name, response.status_code, response.get("X-Request-ID"),
                response.json() if response["Content-Type"] == "application/json" else None])
    print(f"---- {name}", file=sys.stderr, flush=True)

for path in ("/work", "/missing", "/boom"):
    response = client.get(path, headers={"X-Request-ID": "client" + path.replace("/", "-")})
    gevent.sleep(0.1)  # /work's last greenlet logs after the response
    note(path, response)
note("generated-1", client.get("/peek"))
note("generated-2", client.get("/peek"))
with request_storage.scope({"request_id": "pinned"}):
    note("pinned", client.get("/peek", headers={"X-Request-ID": "not-used"}))
out.append(["test", get_request_id()])
print(json.dumps(out))
"""


def run_client(settings: str) -> Tuple[List[Any], Dict[str, Counter[Tuple[str, str]]]]:
    """Run CLIENT_SCRIPT; return its results and each request's log lines."""
    proc = run_python(CLIENT_SCRIPT, args=(settings,), timeout=60, env={
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(ROOT), str(ROOT / "tests")])})
    per_request: Dict[str, Counter[Tuple[str, str]]] = {}
    current: Counter[Tuple[str, str]] = Counter()
    for text in proc.stderr.splitlines():
        if text.startswith("---- "):
            per_request[text[5:]], current = current, Counter()
            continue
        match = LINE_RE.fullmatch(text)
        if match is not None:
            current[match["id"], match["line"]] += 1
    assert not current, current
    return json.loads(proc.stdout), per_request


def test_test_client_gets_ids_from_the_django_middleware() -> None:
    """Django's test Client never calls the WSGI application; with
    ``RequestIdMiddleware`` in MIDDLEWARE its requests get the header's id
    (or a new one each), echoed, seen by the view and its greenlets and on
    their log lines, the 500's ``django.request`` line included. The signal
    handlers and the ``Not Found`` line run outside the middleware and show
    ``-``, unless the test makes a store current around the call, which is
    then used as is (no echo) by everything. The test itself sees no id."""
    results, lines = run_client("mysite.settings")
    generated = [results[3][2], results[4][2]]
    assert all(GENERATED_RE.fullmatch(i) for i in generated) and len(set(generated)) == 2
    assert results == [
        ["/work", 200, "client-work", dict.fromkeys(("view", "greenlet", "pool"), "client-work")],
        ["/missing", 404, "client-missing", None],
        ["/boom", 500, "client-boom", None],
        ["generated-1", 200, generated[0], {"request_id": generated[0]}],
        ["generated-2", 200, generated[1], {"request_id": generated[1]}],
        ["pinned", 200, None, {"request_id": "pinned"}],
        ["test", None],
    ]
    inside = lambda line: line.startswith("mysite.views:") or "Internal Server Error" in line
    for path in ("/work", "/missing", "/boom"):
        assert lines[path] == expected_lines(
            [(path, f"client{path.replace('/', '-')}", 0, {}, b"")], inside), path
    peek = [STARTED.format(path="/peek"), FINISHED]
    assert lines["generated-1"] == lines["generated-2"] == Counter(("-", line) for line in peek)
    assert lines["pinned"] == Counter(("pinned", line) for line in peek)


def test_test_client_without_the_django_middleware_has_no_ids() -> None:
    """Negative control: without ``RequestIdMiddleware`` the test Client's
    requests have no id, no echo, and every log line shows ``-``; a store
    the test makes current still reaches everything."""
    results, lines = run_client(BARE_SETTINGS)
    assert results == [
        ["/work", 200, None, dict.fromkeys(("view", "greenlet", "pool"))],
        ["/missing", 404, None, None],
        ["/boom", 500, None, None],
        ["generated-1", 200, None, {"request_id": None}],
        ["generated-2", 200, None, {"request_id": None}],
        ["pinned", 200, None, {"request_id": "pinned"}],
        ["test", None],
    ]
    for path in ("/work", "/missing", "/boom"):
        assert lines[path] == expected_lines([(path, None, 0, {}, b"")], lambda line: False)
    assert lines["pinned"] == Counter(("pinned", line) for line in
                                      (STARTED.format(path="/peek"), FINISHED))


def test_example_test_suite_passes() -> None:
    """The example's own test suite (``manage.py test``, what a user's suite
    sees) runs from the project's folder and passes."""
    proc = subprocess.run([sys.executable, "manage.py", "test", "-v", "2"], cwd=str(PROJECT),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^Ran 3 tests in ", proc.stderr, re.M) and "\nOK" in proc.stderr, proc.stderr


# -- asl_gevent.django itself ----------------------------------------------------


def test_module_exports_and_imports_no_django() -> None:
    """``asl_gevent.django`` exports the middleware; neither ``asl_gevent``
    nor ``asl_gevent.django`` imports Django."""
    proc = run_python("""
        import sys, asl_gevent
        print(sorted(m for m in sys.modules if m.startswith(('asl_gevent.django', 'django'))))
        import asl_gevent.django
        print(asl_gevent.django.__all__)
        print(sorted(m for m in sys.modules if m.startswith('django')))
    """)
    assert proc.stdout.splitlines() == ["[]", "['RequestIdMiddleware']", "[]"]


def test_middleware_rejects_bad_configuration_when_django_makes_it() -> None:
    """A bad ``get_response`` or class attribute fails when Django builds the
    middleware chain (at startup), naming what is wrong."""
    from asl_gevent.django import RequestIdMiddleware

    def attrs(**values: Any) -> type:
        return type("Custom", (RequestIdMiddleware,), values)

    with pytest.raises(TypeError, match=r"^RequestIdMiddleware\(\) argument 'get_response' "
                                        r"must be callable, not 'NoneType'; "):
        RequestIdMiddleware(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Custom\.header must be a str, not 'bytes'; "):
        attrs(header=b"X-Request-ID")(print)
    with pytest.raises(ValueError, match=r"^Custom\.header must be an HTTP header name "):
        attrs(header="X Request ID")(print)
    with pytest.raises(TypeError, match=r"^Custom\.storage must be an AsyncLocalStorage, "
                                        r"not 'dict'$"):
        attrs(storage={})(print)
    with pytest.raises(TypeError, match=r"^Custom\.echo_header must be a bool, not 'str'; "):
        attrs(echo_header="no")(print)


def test_middleware_subclass_with_its_own_header_and_storage() -> None:
    """A subclass picks the header and the storage; the store is current only
    inside the chain, and a store already current is used as is."""
    from asl_gevent import AsyncLocalStorage
    from asl_gevent.django import RequestIdMiddleware

    tenant_ids: AsyncLocalStorage[Any] = AsyncLocalStorage(name="tenant-ids")

    class Request:
        def __init__(self, meta: Dict[str, Any]) -> None:
            self.META = meta

    class Response(dict):  # type: ignore[type-arg]
        def has_header(self, name: str) -> bool:
            return name.lower() in (key.lower() for key in self)

    class Custom(RequestIdMiddleware):
        header = "X-Correlation-ID"
        storage = tenant_ids

    seen: List[Any] = []

    def view(request: Request) -> Response:
        seen.append(gevent.spawn(tenant_ids.get_store).get(timeout=10))
        return Response()

    middleware = Custom(view)
    request = Request({"HTTP_X_CORRELATION_ID": "corr-1", "HTTP_X_REQUEST_ID": "other"})
    response = middleware(request)
    assert (seen, dict(response)) == ([{"request_id": "corr-1"}],
                                      {"X-Correlation-ID": "corr-1"})
    assert request.META["asl_gevent.request_id"] == "corr-1"
    assert tenant_ids.get_store() is None
    with tenant_ids.scope("already"):
        response = middleware(Request({"HTTP_X_CORRELATION_ID": "corr-2"}))
    assert (seen[1:], dict(response)) == (["already"], {})


# -- docs/howto/django.rst, as a newcomer follows it -------------------------------

PAGE = ROOT / "docs" / "howto" / "django.rst"


def _page_code_block(caption: str) -> str:
    """The ``code-block:: python`` on the Django page whose caption starts with *caption*."""
    match = re.search(r"^\.\. code-block:: python\n   :caption: " + re.escape(caption)
                      + r".*\n(?:   :.*\n)*\n((?:   .*\n|\n)+)", PAGE.read_text(), re.M)
    assert match is not None, caption
    return textwrap.dedent(match.group(1)).strip("\n") + "\n"


def _assigned_list(source: str, name: str) -> List[str]:
    """The list of strings *source* assigns to *name* at module level."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"no {name} = [...]")


def _with_middleware(settings: str, block: str) -> str:
    """*settings* with its ``MIDDLEWARE = [...]`` replaced by *block*."""
    start = settings.index("MIDDLEWARE = [")
    end = settings.index("]\n", start) + 2
    return settings[:start] + block + settings[end:]


def _manage(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=str(project),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_the_page_prepends_the_middleware_to_a_startproject_project(tmp_path: Path) -> None:
    """The page's MIDDLEWARE is startproject's with ``RequestIdMiddleware``
    prepended; so edited, a fresh project passes ``manage.py check`` and its
    test Client's requests get their id. The example project's own short
    list, which the page used to show, fails the check there (admin.E408-E410)."""
    proc = subprocess.run([sys.executable, "-m", "django", "startproject", "proj"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    project = tmp_path / "proj"
    settings_file = project / "proj" / "settings.py"
    generated = settings_file.read_text()

    block = _page_code_block("mysite/settings.py (a startproject project)")
    assert _assigned_list(block, "MIDDLEWARE") == (
        ["asl_gevent.django.RequestIdMiddleware"] + _assigned_list(generated, "MIDDLEWARE"))
    assert ":start-at: MIDDLEWARE" not in PAGE.read_text()

    short = (PROJECT / "mysite" / "settings.py").read_text()
    short_block = "MIDDLEWARE = " + repr(_assigned_list(short, "MIDDLEWARE")) + "\n"
    settings_file.write_text(_with_middleware(generated, short_block))
    broken = _manage(project, "check")
    assert broken.returncode != 0
    assert [e for e in ("admin.E408", "admin.E409", "admin.E410") if e not in broken.stderr] == []

    settings_file.write_text(_with_middleware(generated, block))
    checked = _manage(project, "check")
    assert checked.returncode == 0, checked.stderr
    assert "System check identified no issues (0 silenced)." in checked.stdout
    client = _manage(project, "shell", "-c", textwrap.dedent("""
        from django.test import Client
        from django.test.utils import setup_test_environment
        setup_test_environment()  # what manage.py test does: ALLOWED_HOSTS gets "testserver"
        first = Client().get("/nowhere", headers={"X-Request-ID": "sp-1"})
        second = Client().get("/nowhere")
        print(first.status_code, first["X-Request-ID"], len(second["X-Request-ID"]))
    """))
    assert client.returncode == 0, client.stderr
    assert client.stdout.splitlines()[-1].split() == ["404", "sp-1", "32"]


def test_the_page_includes_what_a_reader_needs() -> None:
    """Signal handlers connected in apps.py ``ready()`` with the app in
    INSTALLED_APPS, tests.py whole (with its imports), an install line that
    needs no package index."""
    page = PAGE.read_text()
    assert ".. literalinclude:: ../../examples/django_app/mysite/apps.py\n" in page
    assert re.search(r"mysite/settings\.py\n(?:   :.*\n)*   :end-at: INSTALLED_APPS =\n", page)
    tests_include = re.search(r"literalinclude:: \.\./\.\./examples/django_app/mysite/tests\.py\n"
                              r"((?:   :.*\n)*)", page)
    assert tests_include is not None
    assert ":start-" not in tests_include.group(1) and ":end-" not in tests_include.group(1)
    assert "pip install 'asl_gevent[" not in page
    assert "your-venv/bin/pip install './asl_gevent[gunicorn,django]'" in page


def test_the_page_wsgi_py_installs_the_http_hook_at_import(tmp_path: Path) -> None:
    """The page's ``wsgi.py`` with :func:`asl_gevent.http.install` is the
    example's plus the two lines; importing it (what gunicorn and runserver
    do) installs the hook, and a request's outgoing calls carry its id."""
    block = _page_code_block("mysite/wsgi.py")
    example = (PROJECT / "mysite" / "wsgi.py").read_text().split('"""\n', 1)[1]
    added = [line for line in block.splitlines() if "asl_gevent.http" in line]
    assert added == ["import asl_gevent.http", "asl_gevent.http.install()"]
    assert [line for line in block.splitlines() if line not in added] == \
        example.strip("\n").splitlines()
    assert block.index("asl_gevent.http.install()") < block.index("application =")
    (tmp_path / "wsgi_with_http.py").write_text(block)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import asl_gevent.http
        from asl_gevent.wsgi import request_storage
        print(asl_gevent.http.is_installed())
        import wsgi_with_http
        print(asl_gevent.http.is_installed(), type(wsgi_with_http.application).__name__)
        print(request_storage.run({"request_id": "w-1"}, asl_gevent.http.outgoing_headers))
    """)], capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(PROJECT), str(ROOT)])))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False", "True RequestContextMiddleware",
                                        "{'X-Request-ID': 'w-1'}"]
