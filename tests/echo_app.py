"""Apps for test_gunicorn_echo.py: start_response called eagerly or lazily,
with or without the app's own X-Request-ID."""

from typing import Any, Callable, Dict, Iterator, List

from asl_gevent.wsgi import RequestContextMiddleware, get_request_id


def _app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
    path = environ["PATH_INFO"]
    own = [("X-Request-ID", "app-own")] if "own" in path else []
    if path.startswith("/lazy"):
        def body() -> Iterator[bytes]:
            start_response("200 OK", [("Content-Type", "text/plain"), *own])
            if "empty" not in path:
                yield f"lazy {get_request_id()}".encode()
        return body()
    data = f"eager {get_request_id()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(data))), *own])
    result: List[bytes] = [data]
    return result


app = RequestContextMiddleware(_app)
