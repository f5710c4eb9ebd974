"""The incoming id policy: validator=, generator=, trust= (issue 14 point 8).

Defaults stay as in 0.2 (every client trusted, any well-formed id adopted);
an id that is not adopted is kept where logs can show it, never as the
request's id.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any, Callable, Dict, List, Tuple

import pytest

from asl_gevent import _ids
from asl_gevent.wsgi import RequestContextMiddleware, get_request_id, request_storage

GENERATED = re.compile(r"[0-9a-f]{32}")


def _serve(middleware_kwargs: Dict[str, Any],
           environ: Dict[str, Any]) -> Tuple[Any, List[Tuple[str, str]], Dict[str, Any]]:
    """(store seen by the app, response headers, environ after the call)."""
    seen: List[Any] = []
    headers: List[Tuple[str, str]] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        seen.append(request_storage.get_store())
        start_response("200 OK", [])
        return []

    def start_response(status: str, response_headers: List[Tuple[str, str]],
                       exc_info: Any = None) -> None:
        headers.extend(response_headers)
    RequestContextMiddleware(app, **middleware_kwargs)(environ, start_response)
    return seen[0], headers, environ


def test_defaults_adopt_a_well_formed_id_as_in_0_2() -> None:
    store, headers, environ = _serve({}, {"HTTP_X_REQUEST_ID": "req-1", "REMOTE_ADDR": "192.0.2.7"})
    assert store == {"request_id": "req-1"}
    assert headers == [("X-Request-ID", "req-1")]
    assert "asl_gevent.client_request_id" not in environ


@pytest.mark.parametrize("trust", [["10.0.0.0/8", "::1"],
                                   [ipaddress.ip_network("10.0.0.0/8")],
                                   lambda environ: environ.get("REMOTE_ADDR", "").startswith("10.")])
def test_an_untrusted_clients_id_is_kept_aside_never_adopted(trust: Any) -> None:
    """From a trusted proxy the id is adopted; from anyone else a new id is
    generated and the client's is kept as client_request_id (store and
    environ), where StoreFilter(fields=...) and access logs can show it."""
    store, headers, _ = _serve({"trust": trust},
                               {"HTTP_X_REQUEST_ID": "via-proxy", "REMOTE_ADDR": "10.1.2.3"})
    assert store == {"request_id": "via-proxy"}
    store, headers, environ = _serve({"trust": trust},
                                     {"HTTP_X_REQUEST_ID": "victim-id", "REMOTE_ADDR": "192.0.2.7"})
    assert GENERATED.fullmatch(store["request_id"])
    assert store == {"request_id": store["request_id"], "client_request_id": "victim-id"}
    assert headers == [("X-Request-ID", store["request_id"])]
    assert environ["asl_gevent.request_id"] == store["request_id"]
    assert environ["asl_gevent.client_request_id"] == "victim-id"


def test_ipv4_mapped_and_unparsable_remote_addresses() -> None:
    trusted = _ids.trust_from(["127.0.0.1"], "t")
    assert trusted is not None
    assert trusted({"REMOTE_ADDR": "::ffff:127.0.0.1"}) is True
    assert trusted({"REMOTE_ADDR": "unix:/run/sock"}) is False
    assert trusted({}) is False
    assert _ids.trust_from([], "t")({"REMOTE_ADDR": "127.0.0.1"}) is False  # type: ignore[misc]


def test_a_malformed_id_is_never_kept_even_aside() -> None:
    store, headers, environ = _serve({"trust": []}, {"HTTP_X_REQUEST_ID": "a b\r\nX-Evil: 1"})
    assert list(store) == ["request_id"] and GENERATED.fullmatch(store["request_id"])
    assert "asl_gevent.client_request_id" not in environ


def test_validator_decides_which_ids_are_adopted() -> None:
    uuid_only = lambda value: re.fullmatch(r"[0-9a-f]{32}", value) is not None  # noqa: E731
    good = "0123456789abcdef0123456789abcdef"
    store, _, _ = _serve({"validator": uuid_only}, {"HTTP_X_REQUEST_ID": good})
    assert store == {"request_id": good}
    store, _, _ = _serve({"validator": uuid_only}, {"HTTP_X_REQUEST_ID": "short"})
    assert store["client_request_id"] == "short" and store["request_id"] != "short"


def test_the_validator_cannot_widen_the_character_rules() -> None:
    """What reaches headers and logs is always 1-128 safe characters."""
    store, headers, _ = _serve({"validator": lambda value: True},
                               {"HTTP_X_REQUEST_ID": "x\r\nSet-Cookie: a=b"})
    assert GENERATED.fullmatch(store["request_id"]) and "client_request_id" not in store


def test_a_raising_validator_or_trust_means_not_adopted(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Any) -> bool:
        raise RuntimeError("boom")
    with caplog.at_level(logging.ERROR, "asl_gevent.wsgi"):
        for kwargs in ({"validator": broken}, {"trust": broken}):
            store, _, _ = _serve(kwargs, {"HTTP_X_REQUEST_ID": "req-9"})
            assert store["client_request_id"] == "req-9" and store["request_id"] != "req-9"
    assert len([r for r in caplog.records if "not adopting" in r.getMessage()]) == 2


def test_generator_makes_the_ids_and_a_bad_one_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    counter = iter(range(1000))
    store, headers, _ = _serve({"generator": lambda: f"svc-{next(counter)}"}, {})
    assert store == {"request_id": "svc-0"} and headers == [("X-Request-ID", "svc-0")]
    with caplog.at_level(logging.ERROR, "asl_gevent.wsgi"):
        middleware_kwargs = {"generator": lambda: "bad id\n"}
        for _ in range(3):
            store, _, _ = _serve(middleware_kwargs, {})
            assert GENERATED.fullmatch(store["request_id"])
    assert len([r for r in caplog.records if "generator returned" in r.getMessage()]) == 3


def test_the_middlewares_request_id_from_applies_its_policy() -> None:
    middleware = RequestContextMiddleware(lambda e, s: [], trust=["10.0.0.0/8"],
                                          generator=lambda: "made-here")
    assert middleware.request_id_from({"HTTP_X_REQUEST_ID": "c1", "REMOTE_ADDR": "10.0.0.1"}) == "c1"
    assert middleware.request_id_from({"HTTP_X_REQUEST_ID": "c1", "REMOTE_ADDR": "8.8.8.8"}) == "made-here"
    assert get_request_id() is None


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"validator": "uuid4"}, TypeError,
     r"^RequestContextMiddleware\(\) argument 'validator' must be callable or None, not 'str'"),
    ({"generator": 42}, TypeError,
     r"^RequestContextMiddleware\(\) argument 'generator' must be callable or None, not 'int'"),
    ({"trust": "10.0.0.0/8"}, TypeError,
     r"^RequestContextMiddleware\(\) argument 'trust' must be a callable trust\(environ\) -> bool, "
     r"a list of networks or None, not 'str'"),
    ({"trust": True}, TypeError, r"^RequestContextMiddleware\(\) argument 'trust' must be"),
    ({"trust": [42]}, TypeError,
     r"^RequestContextMiddleware\(\) argument 'trust' must hold networks .*, not 'int'"),
    ({"trust": ["10.0.0.0/33"]}, ValueError,
     r"^RequestContextMiddleware\(\) argument 'trust' holds '10.0.0.0/33', which is not an IP network"),
    ({"header": "X_Request_ID"}, ValueError,
     r"^RequestContextMiddleware\(\) argument 'header' must be an HTTP header name "
     r"\(letters, digits, '-'\), not 'X_Request_ID'"),
])
def test_bad_policy_arguments_are_errors_naming_the_argument(
        kwargs: Dict[str, Any], error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        RequestContextMiddleware(lambda e, s: [], **kwargs)


def test_header_names_the_error_text_promises_are_accepted() -> None:
    """Letters, digits and '-': exactly what the message says (issue 15)."""
    for name in ("X-Request-ID", "x-correlation-id", "Request-Id-2"):
        RequestContextMiddleware(lambda e, s: [], header=name)
    for name in ("X_Request_ID", "X.Request", "X~ID", "X ID"):
        with pytest.raises(ValueError, match=r"letters, digits, '-'"):
            RequestContextMiddleware(lambda e, s: [], header=name)
