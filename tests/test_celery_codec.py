"""The ``asl_gevent`` Celery header codec: the decoder never raises and is
bounded; the encoder refuses what cannot travel without paying for it.

The worker-level behaviour (real workers on every pool) is in
``test_celery_boundary.py``; this file checks the pure functions, fuzzed with
hypothesis.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asl_gevent import _celery_codec as codec
from asl_gevent._celery_codec import MAX_DEPTH, decode, encode_store, header_limit, join_header

LIMIT = 16384
# One decode of anything up to the header limit (256 KiB) takes a few ms
# here; the bound leaves room for a loaded 2-core machine.
DECODE_BOUND_S = 0.5


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Any:
    codec._warned.clear()
    yield
    codec._warned.clear()


def timed_decode(header: object) -> Optional[Any]:
    t0 = time.perf_counter()
    result = decode(header, LIMIT)
    elapsed = time.perf_counter() - t0
    assert elapsed < DECODE_BOUND_S, (elapsed, repr(header)[:200])
    return result


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)


def hostile_texts() -> st.SearchStrategy[str]:
    """Text shaped like our header and its failure modes: fragments of
    valid headers, brackets, quotes and escapes, long runs of any of them."""
    fragments = st.sampled_from([
        "{", "}", "[", "]", '"', "\\", ":", ",", '"r":', '"s":', '"p":', '"request_id":',
        '"req-1"', "null", "1", "-0.5e9", "NaN", "Infinity", "\\ud800", '"\\"', " ", "\x00",
        "\r\n", "é", "\udcff", "9" * 50])
    run = st.tuples(fragments, st.integers(1, 3000)).map(lambda t: t[0] * t[1])
    return st.lists(fragments | run, max_size=30).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(hostile_texts(), st.text(), json_values.map(json.dumps), json_values))
def test_decode_never_raises_and_is_bounded(header: Any) -> None:
    """Whatever the header holds (text or not, JSON or not), decode returns
    None or a dict of checked parts, within the time bound."""
    result = timed_decode(header)
    assert result is None or isinstance(result, dict)
    if result:
        assert set(result) <= {"r", "s", "p"}
        if "r" in result:
            assert codec._ID_RE.fullmatch(result["r"]["request_id"])
        if "s" in result:
            assert isinstance(result["s"], dict)
        if "p" in result:
            assert result["p"] is None or isinstance(result["p"], str)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=4),
       st.from_regex(r"[A-Za-z0-9._:@/+=-]{1,128}", fullmatch=True))
def test_what_the_encoder_sends_the_decoder_restores(named: Any, request_id: str) -> None:
    """A header built by the publisher's encoder decodes to equal values
    (tuples come back as lists, as JSON does)."""
    texts = [(name, encode_store(store, LIMIT)[0]) for name, store in named.items()]
    assert all(text is not None for _, text in texts)
    request_text = encode_store({"request_id": request_id, "user": "u"}, LIMIT)[0]
    header = join_header(request_text, [(n, t) for n, t in texts if t is not None], "pid", True)
    expected = {"r": {"request_id": request_id, "user": "u"}, "p": "pid"}
    if named:
        expected["s"] = json.loads(json.dumps(named))
    assert timed_decode(header) == expected


@pytest.mark.parametrize("header", [
    "[" * 100_000,                                   # RecursionError in json.loads (0.2)
    '{"s":{"t":' + "[" * 960 + "]" * 960 + "}}",     # a legitimate-looking deep store
    "{" * 100_000,
    '{"s":{"t":"' + "\\\"" * 200_000 + '"}}',
    "1" * 200_000,                                   # quadratic int parsing on 3.10
    '{"s":{"t":' + "9" * (4301) + "}}",
    '{"s":{"t":"' + "x" * 5_000_000 + '"}}',         # over 16 x max_store_bytes
    "[" * 40_000 + "]" * 40_000,
    "[]" * 100_000,
    '"' + "[" * 100_000,
], ids=["deep-list", "deep-store", "braces", "escapes", "digits", "long-int", "huge",
        "deep-pairs", "flat", "open-string"])
def test_hostile_headers_are_dropped_quickly(header: str, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    """Each is refused (None) within the bound; nothing propagates."""
    with caplog.at_level(logging.WARNING, "asl_gevent.celery"):
        assert timed_decode(header) is None
    assert len(caplog.records) == 1


def test_wrong_types_are_dropped_part_by_part_with_one_warning_per_cause(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request store whose id would fail X-Request-ID validation, a parent
    id that is not a str, named stores that are not an object: each part is
    dropped alone, warned once however often it comes."""
    bad = json.dumps({"r": {"request_id": "evil\r\nINFO forged"}, "p": {"evil": 1},
                      "s": {"tenant": "acme"}})
    with caplog.at_level(logging.WARNING, "asl_gevent.celery"):
        for _ in range(3):
            assert decode(bad, LIMIT) == {"s": {"tenant": "acme"}}
        assert decode('{"r":"x","s":[1],"p":"ok-parent"}', LIMIT) == {"p": "ok-parent"}
        assert decode('{"r":{"user":"u"},"p":null}', LIMIT) == {"p": None}
        assert decode('{"p":"a\\u0085b"}', LIMIT) == {}
        for header in ({"r": 1}, ["x"], 7, b"{}", None):
            assert decode(header, LIMIT) is None
        assert decode("NaN", LIMIT) is None
        assert decode("[]", LIMIT) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 6, messages
    assert sum("dropping a request store" in m for m in messages) == 1
    assert sum("dropping a parent task id" in m for m in messages) == 1
    assert sum("dropping named stores that are a JSON list" in m for m in messages) == 1
    assert sum("not a str" in m for m in messages) == 1
    assert sum("not valid JSON" in m for m in messages) == 1
    assert sum("header that is a JSON list, not an object" in m for m in messages) == 1


def test_the_header_limit_follows_max_store_bytes() -> None:
    assert header_limit(16384) == 262144
    store = "x" * 1000
    header = join_header(None, [(f"n{i}", json.dumps(store)) for i in range(20)])
    assert header is not None and len(header) > header_limit(1024)
    assert decode(header, 1024) is None
    assert decode(header, 16384) == {"s": {f"n{i}": store for i in range(20)}}


# -- encoder -----------------------------------------------------------------------

class Cycle(list):  # type: ignore[type-arg]
    pass


def _deep(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


def test_encoder_refuses_what_cannot_travel_and_says_why() -> None:
    cycle: list = []  # type: ignore[type-arg]
    cycle.append(cycle)
    cases = {
        "surrogate": ({"file": "report-\udcff.csv"}, "lone surrogate"),
        "cycle": (cycle, "circular reference"),
        "object": ({"when": object()}, "'object' is not JSON-serialisable"),
        "key": ({(1, 2): "x"}, "key of type 'tuple'"),
        "nan": ([float("nan")], "json.dumps refused it (ValueError"),
        "big": ("x" * 5_000_000, "over max_store_bytes=16384"),
        "wide": (list(range(5_000_000)), "over max_store_bytes=16384"),
        "deep": (_deep(960), f"more than {MAX_DEPTH} containers"),
        "multibyte": ("é" * 9000, "is 18002 bytes as JSON, over max_store_bytes=16384"),
    }
    for name, (store, reason) in cases.items():
        text, why = encode_store(store, LIMIT)
        assert text is None and reason in why, (name, why)
    assert encode_store(_deep(MAX_DEPTH - 1), LIMIT)[0] == "[" * 63 + '"leaf"' + "]" * 63
    assert encode_store({"é": (1, None, True, 2.5)}, LIMIT) == ('{"é":[1,null,true,2.5]}', "")
    assert encode_store("x" * (LIMIT - 2), LIMIT)[0] is not None
    assert encode_store("x" * (LIMIT - 1), LIMIT)[0] is None


@pytest.mark.parametrize("store", [
    "x" * 5_000_000,
    {"blob": "x" * 5_000_000},
    list(range(2_000_000)),
    [["x" * 100] * 1000] * 1000,
    {str(i): i for i in range(500_000)},
], ids=["str", "nested-str", "ints", "shared-lists", "dict"])
def test_encoder_refuses_a_large_store_without_encoding_it(store: Any) -> None:
    """A store of megabytes costs about what one at the limit does: under a
    millisecond-scale bound, not the time json.dumps takes for all of it."""
    t0 = time.perf_counter()
    for _ in range(10):
        assert encode_store(store, LIMIT)[0] is None
    elapsed = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    json.dumps(store)
    full = time.perf_counter() - t0
    assert elapsed < 0.01 and elapsed < full / 5, (elapsed, full)


def test_module_docstring_examples() -> None:
    """The codec's docstring examples run as written."""
    import doctest
    result = doctest.testmod(codec, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


@settings(max_examples=400, deadline=None)
@given(json_values | st.tuples(json_values, json_values)
       | st.dictionaries(st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False,
                                                                               allow_infinity=False),
                         json_values, max_size=3))
def test_the_size_bound_is_exact(store: Any) -> None:
    """A store of exactly max_store_bytes as UTF-8 JSON travels, unchanged;
    one byte less of limit and it is refused: the cheap bound checked before
    encoding never refuses a store that fits."""
    text = json.dumps(store, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode("utf-8"))
    assert encode_store(store, size) == (text, "")
    assert encode_store(store, size - 1)[0] is None
