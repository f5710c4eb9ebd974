"""Incoming ``baggage`` is client input: checked, shaped by the app, bounded.

Issue 14 points 4 and 5: a client could forge log lines through restored
values, choose a store's type, overwrite the request id through the
middleware's own storage, and make the server split a 6 MB header.
"""

from __future__ import annotations

import io
import json
import logging
import time
import tracemalloc
from typing import Any, Callable, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asl_gevent import AsyncLocalStorage
from asl_gevent._baggage import MAX_BYTES, MAX_MEMBERS, decode
from asl_gevent.logfilter import StoreFilter
from asl_gevent.wsgi import RequestContextMiddleware, request_storage
from helpers import run_python

CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]] + ["\u2028", "\u2029"]


def _restored(middleware_kwargs: Dict[str, Any], header: str,
              *storages: AsyncLocalStorage[Any]) -> List[Any]:
    seen: List[Any] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        seen.extend(s.get_store() for s in storages)
        start_response("200 OK", [])
        return []
    RequestContextMiddleware(app, **middleware_kwargs)({"HTTP_BAGGAGE": header},
                                                       lambda *a: None)
    return seen


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_values_with_control_characters_are_dropped(control: str) -> None:
    """A member whose percent-decoded value holds a C0, DEL, C1 or line
    separator character is dropped; its neighbours are kept."""
    tenant = AsyncLocalStorage(name="tenant")
    user = AsyncLocalStorage(name="user")
    encoded = "".join(f"%{b:02X}" for b in control.encode())
    header = f"tenant=gold{encoded}x,user.role=admin,user.name=a{encoded}"
    assert _restored({"baggage": [tenant, (user, dict)]}, header, tenant, user) == [
        None, {"role": "admin"}]


# Unicode bidirectional controls (the "Trojan Source" set, CVE-2021-42574,
# plus the implicit marks): a value holding one makes a log viewer or
# terminal redraw the REST of the line, the fields after it included.
BIDI = ["\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)),
        *map(chr, range(0x2066, 0x206A))]


@pytest.mark.parametrize("control", BIDI, ids=lambda c: f"U+{ord(c):04X}")
def test_values_with_bidi_controls_are_dropped(control: str) -> None:
    """A member whose decoded value holds a bidi control is dropped like one
    with a C0 control: through StoreFilter, ``tenant=acme<RLO>...`` would
    show the request id and message after it reversed, so a reader sees a
    different line from the one written."""
    tenant = AsyncLocalStorage(name="tenant")
    user = AsyncLocalStorage(name="user")
    encoded = "".join(f"%{b:02X}" for b in control.encode())
    header = f"tenant=acme{encoded}x,user.role=admin,user.name=a{encoded}"
    assert _restored({"baggage": [tenant, (user, dict)]}, header, tenant, user) == [
        None, {"role": "admin"}]


def test_zero_width_characters_are_kept() -> None:
    """Zero-width characters (U+200B, joiners, U+FEFF) change how the value
    itself looks, not the rest of the line: kept, as documented."""
    assert decode("a=ad%E2%80%8Bmin,b=%F0%9F%91%A9%E2%80%8D%F0%9F%92%BB") == {
        "a": "ad\u200bmin", "b": "\U0001f469\u200d\U0001f4bb"}


def test_decode_drops_the_forged_line_of_issue_14() -> None:
    """The issue's reproduction at the decoder: LF, NUL and ESC never come out."""
    assert decode("tenant.plan=gold%0AINFO%20%5Badmin%5D%20x,a=%00,b=%1B[2K,c=ok") == {"c": "ok"}


def test_raw_bytes_outside_the_baggage_octets_are_dropped() -> None:
    """A raw control or non-ASCII character (not percent-encoded) makes the
    member malformed: dropped."""
    tenant = AsyncLocalStorage(name="tenant")
    for raw in ("a\x1bb", "a\x85b", "a\xe9b", "a b"):
        assert _restored({"baggage": [tenant]}, f"tenant={raw}", tenant) == [None]
    assert _restored({"baggage": [tenant]}, "tenant=a%C3%A9b", tenant) == ["a\u00e9b"]


def test_a_forged_log_line_through_store_filter_is_no_longer_possible() -> None:
    """issue 14: ``tenant.plan=gold%0AINFO [admin] ...`` printed two lines
    through StoreFilter; now the member is dropped and one line is printed."""
    tenant = AsyncLocalStorage(name="tenant")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(StoreFilter(tenant, fields=("plan",)))
    handler.setFormatter(logging.Formatter("%(levelname)s [%(plan)s] %(message)s"))
    log = logging.getLogger("test_baggage_in.forge")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        log.info("checkout")
        start_response("200 OK", [])
        return []
    try:
        forged = "gold%0AINFO%20%5Badmin%5D%20refund%20approved%0D%1B%5B2K"
        RequestContextMiddleware(app, baggage=[(tenant, dict)])(
            {"HTTP_BAGGAGE": f"tenant.plan={forged}"}, lambda *a: None)
        RequestContextMiddleware(app, baggage=[(tenant, dict)])(
            {"HTTP_BAGGAGE": "tenant.plan=gold"}, lambda *a: None)
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["INFO [-] checkout", "INFO [gold] checkout"]


def test_the_app_declares_the_shape_never_the_client() -> None:
    """A storage alone is a str store (``name=value``); ``(storage, dict)`` a
    new dict of str to str (``name.key=value``). The other shape is ignored."""
    tenant = AsyncLocalStorage(name="tenant")
    user = AsyncLocalStorage(name="user")
    kwargs = {"baggage": [tenant, (user, dict)]}
    assert _restored(kwargs, "tenant.plan=gold,user=admin", tenant, user) == [None, None]
    assert _restored(kwargs, "tenant=acme,user.role=admin,user.x=1", tenant, user) == [
        "acme", {"role": "admin", "x": "1"}]
    assert _restored({"baggage": [(tenant, str)]}, "tenant=acme", tenant) == ["acme"]


@pytest.mark.parametrize("own", ["default", "custom"])
def test_the_middlewares_own_storage_is_refused_as_a_baggage_target(own: str) -> None:
    """``baggage=[request_storage]`` let ``request.request_id=evil%0D%0A``
    replace the validated id; now it is a ValueError at construction."""
    app = lambda environ, start_response: []  # noqa: E731
    mine = AsyncLocalStorage(name="mine")
    kwargs: Dict[str, Any] = ({"baggage": [request_storage]} if own == "default"
                              else {"storage": mine, "baggage": [(mine, dict)]})
    with pytest.raises(ValueError, match=r"^RequestContextMiddleware\(\) argument 'baggage' "
                                         r"must not hold the middleware's own storage "):
        RequestContextMiddleware(app, **kwargs)
    with pytest.raises(ValueError, match=r"argument 'baggage' must not hold"):
        RequestContextMiddleware(app, storage=mine, baggage=[request_storage])


def test_a_bad_shape_is_a_type_error_naming_baggage() -> None:
    tenant = AsyncLocalStorage(name="tenant")
    with pytest.raises(TypeError, match=r"^RequestContextMiddleware\(\) argument 'baggage': "
                                        r"the shape of .* must be str or dict, not <class 'list'>"):
        RequestContextMiddleware(lambda e, s: [], baggage=[(tenant, list)])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x2070), max_size=400)
       | st.lists(st.sampled_from(["k=", "v", "%", "0A", "C2", "85", ",", ";", "=", " ", "%25",
                                   "k.a=", "%E2%80%A8", "%E2%80%AE", "%E2%81%A6", "\x00"]),
                  max_size=60).map("".join))
def test_decode_never_raises_and_restores_no_control_character(header: str) -> None:
    """Fuzz: never raises, keys are tokens, values hold no control character."""
    found = decode(header)
    assert len(found) <= MAX_MEMBERS
    for key, value in found.items():
        assert key and "," not in key and "=" not in key
        assert not any(c in value for c in CONTROLS + BIDI)


# -- point 5: the cost is bounded by the limits, not the header -------------------

def _big(size: int) -> str:
    member = "tenant.k=" + "v" * 60
    return ",".join([member] * (size // (len(member) + 1)))


def _cost(header: str, rounds: int = 5) -> tuple:
    """(peak bytes allocated while decoding, best seconds of `rounds` runs)."""
    decode(header)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        decode(header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(20):
            decode(header)
        best = min(best, time.perf_counter() - start)
    return peak, best


def test_a_6mb_header_costs_what_an_8kb_one_does_in_process() -> None:
    """decode() reads at most 8,192 characters: a 6 MB header allocates and
    takes no more than 2x what an 8 KB one does (0.2: ~15x its size in
    memory, and time proportional to it)."""
    small, huge = _big(MAX_BYTES), _big(6_000_000)
    assert len(huge) > 700 * len(small)
    assert decode(huge) == decode(small) and len(decode(small)) == 1
    small_peak, small_time = _cost(small)
    huge_peak, huge_time = _cost(huge)
    assert huge_peak <= 2 * small_peak + 4096, (huge_peak, small_peak)
    assert huge_time <= 2 * small_time + 0.002, (huge_time, small_time)


def test_member_and_byte_limits_are_kept_when_reading_stops_early() -> None:
    """180 members at most; a member that runs past 8,192 bytes is dropped whole."""
    many = ",".join(f"k{n}=v" for n in range(400))
    assert list(decode(many)) == [f"k{n}" for n in range(MAX_MEMBERS)]
    edge = "a=1," + "b" * (MAX_BYTES - 6) + "=2"      # exactly 8,192 + 0 bytes: kept
    assert len(edge) == MAX_BYTES and decode(edge) == {"a": "1", "b" * (MAX_BYTES - 6): "2"}
    over = edge + "2"                                   # one byte more: dropped whole
    assert decode(over) == {"a": "1"}
    assert decode(edge + ",c=3") == decode(edge)


def test_a_6mb_header_through_pywsgi_costs_what_an_8kb_one_does() -> None:
    """A real gevent.pywsgi server, a client sending baggage as 97 header
    lines of 63 KB (pywsgi joins them): the middleware's share of the
    server's memory peak and CPU is within 2x of an 8 KB header's."""
    proc = run_python(r"""
        import json, time, tracemalloc
        from gevent import socket
        import gevent
        from gevent.pywsgi import WSGIServer
        from asl_gevent import AsyncLocalStorage
        from asl_gevent.wsgi import RequestContextMiddleware

        tenant = AsyncLocalStorage(name="tenant")
        seen = []

        def app(environ, start_response):
            seen.append((len(environ.get("HTTP_BAGGAGE", "")), tenant.get_store()))
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]

        middleware = RequestContextMiddleware(app, baggage=[tenant])
        costs = []

        def measured(environ, start_response):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            start = time.process_time()
            result = middleware(environ, start_response)
            costs.append((time.process_time() - start,
                          tracemalloc.get_traced_memory()[1] - base))
            return result

        server = WSGIServer(("127.0.0.1", 0), measured, log=None)
        server.start()
        port = server.server_port

        def request(lines):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            head = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            head += "".join(f"baggage: {line}\r\n" for line in lines)
            s.sendall((head + "\r\n").encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            assert data.startswith(b"HTTP/1.1 200"), data[:200]

        member = "tenant=" + "v" * 62
        small = [",".join([member] * 100)]                 # ~7 KB
        huge = [",".join([member] * 900)] * 97             # 97 lines of 63 KB: 6.1 MB
        tracemalloc.start()
        results = {}
        for name, lines in (("small", small), ("huge", huge)) * 3:
            costs.clear()
            g = gevent.spawn(request, lines)
            g.join(60)
            assert g.successful(), g.exception
            results.setdefault(name, []).append(costs[0])
        print(json.dumps({"results": results, "seen": seen}))
    """)
    out = json.loads(proc.stdout)
    sizes = sorted({size for size, _ in out["seen"]})
    assert sizes[0] < 8192 and sizes[1] > 6_000_000
    assert all(store == "v" * 62 for _, store in out["seen"])
    small, huge = out["results"]["small"], out["results"]["huge"]
    small_cpu, huge_cpu = min(c for c, _ in small), min(c for c, _ in huge)
    small_mem, huge_mem = min(m for _, m in small), min(m for _, m in huge)
    assert huge_mem <= 2 * small_mem + 16384, (huge_mem, small_mem)
    assert huge_cpu <= 2 * small_cpu + 0.003, (huge_cpu, small_cpu)
