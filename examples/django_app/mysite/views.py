"""Views that log, spawn greenlets and fail; none of them is passed the id."""

import io
import logging

import gevent
import gevent.pool
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse

from asl_gevent.wsgi import get_request_id

log = logging.getLogger(__name__)

# Made at import time, as apps do: its greenlets serve every request.
pool = gevent.pool.Pool(10)


def peek(request: HttpRequest) -> HttpResponse:
    """The id this request sees."""
    return JsonResponse({"request_id": get_request_id()})


def _load_profile() -> str | None:
    gevent.sleep(0.01)  # stands for a database call: other requests run meanwhile
    log.info("greenlet: loading the profile")
    return get_request_id()


def _render() -> str | None:
    log.info("pool task: rendering")
    return get_request_id()


def work(request: HttpRequest) -> HttpResponse:
    """Spawns a greenlet and a pool task and waits for them; leaves one more
    greenlet running after the response."""
    log.info("view: working")
    profile = gevent.spawn(_load_profile)
    page = pool.spawn(_render)
    gevent.spawn_later(0.02, log.info, "after the response: sending the audit event")
    return JsonResponse({"view": get_request_id(), "greenlet": profile.get(timeout=10),
                         "pool": page.get(timeout=10)})


def boom(request: HttpRequest) -> HttpResponse:
    """Fails: Django answers 500 and logs the error on django.request."""
    log.info("view: about to fail")
    raise RuntimeError("boom")


def download(request: HttpRequest) -> HttpResponse:
    """A file response: the server sends it through its wsgi.file_wrapper."""
    log.info("view: download")
    return FileResponse(io.BytesIO(b"report\n"), filename="report.txt")
