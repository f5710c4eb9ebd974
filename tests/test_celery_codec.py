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
from asl_gevent._celery_codec import (MAX_DEPTH, REQUEST_KEYS, decode, encode_store, header_limit,
                                      join_header, task_id)
from asl_gevent._ids import is_safe

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
        "\r\n", "é", "\udcff", "9" * 50, '\\"', "1e999", "\u2028"])
    run = st.tuples(fragments, st.integers(1, 3000)).map(lambda t: t[0] * t[1])
    return st.lists(fragments | run, max_size=30).map("".join)


def worst_case_texts() -> st.SearchStrategy[str]:
    """The shapes that were superlinear, up to the header limit: an
    unterminated string of escaped quotes (quadratic string stripping) and
    runs of digits just under and over the 4,300-digit limit."""
    limit = header_limit(LIMIT)
    escapes = st.tuples(st.sampled_from(['"', '{"s":{"t":"', "["]), st.integers(0, limit // 2 - 8),
                        st.sampled_from(['\\"', '\\\\', '"\\"'])).map(
        lambda t: (t[0] + t[2] * t[1])[:limit])
    digits = st.tuples(st.integers(4290, 4310), st.sampled_from([",", " ", "[", '"']),
                       st.integers(1, 60)).map(
        lambda t: ("[" + ("1" * t[0] + t[1]) * t[2])[:limit])
    return escapes | digits


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(hostile_texts(), worst_case_texts(), st.text(), json_values.map(json.dumps),
                 json_values))
def test_decode_never_raises_and_is_bounded(header: Any) -> None:
    """Whatever the header holds (text or not, JSON or not), decode returns
    None or a dict of checked parts, within the time bound."""
    result = timed_decode(header)
    assert result is None or isinstance(result, dict)
    if result:
        assert set(result) <= {"r", "s", "p"}
        if "r" in result:
            assert codec._ID_RE.fullmatch(result["r"]["request_id"])
            assert set(result["r"]) <= set(REQUEST_KEYS)
            assert all(is_safe(value) for value in result["r"].values())
        if "s" in result:
            assert isinstance(result["s"], dict)
            # Re-encodable for continuations: finite, no lone surrogates.
            json.dumps(result["s"], ensure_ascii=False, allow_nan=False).encode("utf-8")
        if "p" in result:
            assert result["p"] is None or task_id(result["p"]) == result["p"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=4),
       st.from_regex(r"[A-Za-z0-9._:@/+=-]{1,128}", fullmatch=True))
def test_what_the_encoder_sends_the_decoder_restores(named: Any, request_id: str) -> None:
    """A header built by the publisher's encoder decodes to equal values
    (tuples come back as lists, as JSON does)."""
    texts = [(name, encode_store(store, LIMIT)[0]) for name, store in named.items()]
    assert all(text is not None for _, text in texts)
    request_text = encode_store({"request_id": request_id, "client_request_id": "c-1",
                                 "user": "u"}, LIMIT)[0]
    header = join_header(request_text, [(n, t) for n, t in texts if t is not None], "pid", True)
    expected = {"r": {"request_id": request_id, "client_request_id": "c-1", "user": "u"},
                "p": "pid"}
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


# -- the second review (F1-F5) -------------------------------------------------

def _best_of(header: str, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        decode(header, LIMIT)
        best = min(best, time.perf_counter() - t0)
    return best


def _legit(size: int) -> str:
    """A header a publisher sends, *size* characters: many short strings with
    escapes and numbers, the most work per character for a valid header."""
    item = '"a\\"b",1234567,'
    body = item * ((size - 40) // len(item))
    return ('{"r":{"request_id":"req-1"},"s":{"t":[' + body + '0]}}')


WORST = {
    "escaped-quotes": lambda n: '"' + '\\"' * ((n - 1) // 2),
    "escaped-quotes-in-store": lambda n: '{"s":{"t":"' + '\\"' * ((n - 11) // 2),
    "backslashes": lambda n: '"' + "\\" * (n - 1),
    "quotes": lambda n: '"' * n,
    "digit-runs": lambda n: "[" + ("1" * 4300 + ",") * ((n - 1) // 4301),
    "one-long-digit-run": lambda n: "[" + "1" * (n - 1),
}


@pytest.mark.parametrize("shape", list(WORST))
def test_worst_case_headers_decode_in_linear_time(shape: str) -> None:
    """F1: string stripping and the long-number check are linear. Each shape
    at 16 K, 64 K and the 262,144-character limit decodes in no more than 10x
    a legitimate header of the same size (a ratio: robust on a loaded
    machine). Measured here: every shape <= 15 ms at the limit, the
    legitimate header ~10 ms; the first string pattern took 0.68 s at 16 K
    and ~181 s at the limit for "escaped-quotes" (quadratic), holding the GIL."""
    limit = header_limit(LIMIT)
    for size in (16_384, 65_536, limit):
        header = WORST[shape](size)
        assert len(header) <= limit
        assert decode(header, LIMIT) is None
        worst, legit = _best_of(header), _best_of(_legit(size))
        assert worst < max(10 * legit, 0.005), (shape, size, worst, legit)
    assert worst < 0.2


def test_request_store_drops_a_forged_client_id_alone(caplog: pytest.LogCaptureFixture) -> None:
    """F2: a forged client_request_id (which a StoreFilter would write into
    log lines) is dropped, with one warning; the valid request id and the
    app's own fields beside it come back as sent."""
    forged = json.dumps({"r": {"request_id": "req-1", "client_request_id": "x\nCRITICAL forged",
                               "user": "u"}})
    with caplog.at_level(logging.WARNING, "asl_gevent.celery"):
        assert decode(forged, LIMIT) == {"r": {"request_id": "req-1", "user": "u"}}
        assert decode(forged, LIMIT) == {"r": {"request_id": "req-1", "user": "u"}}
    assert decode('{"r":{"request_id":"req-1","client_request_id":"c-9"}}', LIMIT) == {
        "r": {"request_id": "req-1", "client_request_id": "c-9"}}
    assert decode('{"r":{"request_id":"req-1","client_request_id":7}}', LIMIT) == {
        "r": {"request_id": "req-1"}}
    assert decode('{"r":{"request_id":"req-1","user":"\\ud800"}}', LIMIT) == {
        "r": {"request_id": "req-1"}}
    assert [r.getMessage() for r in caplog.records if "client_request_id" in r.getMessage()] == [
        "asl_gevent.celery: dropping a client_request_id that is not a valid X-Request-ID: "
        "'x\\nCRITICAL forged'; warned once per cause"]


@pytest.mark.parametrize("value", [
    "x\nCRITICAL forged", "a\rb", "a\x00b", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b",
    "\ud800", "a\udfffb", "", "x" * 256, 7, ["a"], {"a": 1},
    # bidi controls: a log viewer would redraw the rest of the line reversed
    "t\u202eCRITICAL", "t\u2066x", "t\u200fx", "t\u061cx"])
def test_task_ids_refuse_log_breaks_and_lone_surrogates(value: Any) -> None:
    """F3/F4: one rule for the task id, Celery's parent_id and our "p": no
    C0/C1/DEL, no U+2028/U+2029, no lone surrogate, 1 to 255 characters."""
    assert task_id(value) is None
    if isinstance(value, str):
        assert decode(json.dumps({"p": value}), LIMIT) == {}


def test_task_ids_accept_what_celery_makes() -> None:
    for value in ("d3b07384-d9a7-4f6c-9a2b-1c2d3e4f5a6b", "x" * 255, "retry é 1", "\U0001f600"):
        assert task_id(value) == value
        assert decode(json.dumps({"p": value}), LIMIT) == {"p": value}


def test_named_stores_with_lone_surrogates_are_dropped_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """F4: a lone surrogate (in a value, a key or the store's name) cannot be
    re-encoded for continuations nor written by a UTF-8 log handler: that
    store is dropped, the others kept; control characters are app data."""
    header = ('{"s":{"bad":"\\udfff","bad-key":{"\\ud800":1},"\\udc00":1,'
              '"pair":"\\ud83d\\ude00","ctl":"a\\nb"}}')
    with caplog.at_level(logging.WARNING, "asl_gevent.celery"):
        assert decode(header, LIMIT) == {"s": {"pair": "\U0001f600", "ctl": "a\nb"}}
    assert len(caplog.records) == 1
    # A raw (unescaped) lone surrogate, as a broker client may deliver one.
    assert decode('{"s":{"t":"\udfff","u":1}}', LIMIT) == {"s": {"u": 1}}


@pytest.mark.parametrize("number", ["1e999", "-1e400", "1" * 400 + ".0", "1e309"])
def test_non_finite_numbers_are_refused(number: str) -> None:
    """F5: json.loads makes inf of these; re-encoded for a continuation it
    became ``Infinity``, which the next worker refused (losing the id for
    later chain links). Now the header is refused like NaN."""
    assert decode('{"r":{"request_id":"rid-1"},"s":{"t":' + number + "}}", LIMIT) is None
    assert decode('{"s":{"t":1e308,"u":-2.5e-300}}', LIMIT) == {"s": {"t": 1e308, "u": -2.5e-300}}
