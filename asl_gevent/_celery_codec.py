"""The ``asl_gevent`` Celery message header: a bounded encoder and a decoder that never raises.

The header is one JSON text, ``{"r": request store, "s": {name: store, ...},
"p": parent task id}`` (every key optional). It is written by a publisher we
do not control and read by a worker that must not fail because of it, so
both ends work within bounds fixed before they look at the data, and both
follow from ``max_store_bytes`` (:func:`asl_gevent.celery.install`):

- a store is at most ``max_store_bytes`` as UTF-8 JSON and nests at most
  :data:`MAX_DEPTH` containers;
- a header is at most :func:`header_limit` characters and nests at most
  ``MAX_DEPTH + 2`` (the header's own object and ``"s"``).

:func:`encode_store` refuses a store over the limit after at most
``O(max_store_bytes)`` work whatever the store's size (a 5 MB store costs
what a 16 KB one does), and refuses what :func:`json.dumps` would refuse or
what is not UTF-8 (lone surrogates) instead of raising.
:func:`decode` checks size and nesting before :func:`json.loads` runs (a
deep text would raise :class:`RecursionError`, a long number cost quadratic
time on Python 3.10), catches every error, warns once per cause, and keeps
only what has the declared shape: a request store whose ``request_id``
passes the checks an incoming ``X-Request-ID`` passes, without a
``client_request_id`` that does not; named stores as a JSON object, each without a
lone surrogate; a parent id that passes :func:`task_id` or is ``None``.
Numbers are finite. The checks before decoding are linear in the header's
length whatever it holds.

>>> decode('{"r":{"request_id":"req-1"},"s":{"tenant":"acme"}}')
{'r': {'request_id': 'req-1'}, 's': {'tenant': 'acme'}}
>>> decode("[" * 5000) is None  # warned once: too deep
True
"""

from __future__ import annotations

import json
import logging
import re
from itertools import accumulate
from math import isfinite
from typing import Any, Dict, List, Optional, Set, Tuple

from ._ids import LOG_UNSAFE
from ._ids import is_safe as _is_safe

__all__ = ["MAX_DEPTH", "DEFAULT_MAX_STORE_BYTES", "REQUEST_KEYS", "header_limit", "encode_store",
           "join_header", "task_id", "decode"]

_log = logging.getLogger("asl_gevent.celery")

#: The deepest nesting of containers in one store. json.loads recurses once
#: per level (in C, counted against the interpreter's recursion limit): at
#: ~960 levels a worker already deep in Celery's stack raised RecursionError
#: outside Celery's error handling and the solo worker exited (0.2).
MAX_DEPTH = 64

DEFAULT_MAX_STORE_BYTES = 16384

#: The keys of a request store that StoreFilter writes into log lines by
#: default; each must pass the id rule (:func:`asl_gevent._ids.is_safe`).
REQUEST_KEYS = ("request_id", "client_request_id")

# CPython 3.11's default int_max_str_digits: a longer number cannot be
# written by json.dumps there, and parsing one is quadratic on 3.10.
_MAX_DIGITS = 4300

# A JSON string, unrolled so re never backtracks (Friedl's "unrolling the
# loop"); an unterminated one runs to the end of the text (json.loads will
# refuse it). The loop stops only before a '"' or at the end (after at most a
# lone backslash), so the last group matches at once: one pass, never a retry
# from a later start. The first pattern required the closing quote, and
# '"' + '\\"' * n made every later quote start a fresh O(n) attempt: O(n^2),
# ~3 minutes at the 262,144-character limit, holding the GIL.
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
# Only from the start of a run of digits: searching from every position in a
# run cost O(run x 4300).
_LONG_NUMBER_RE = re.compile(r"(?<![0-9])[0-9]{%d}" % (_MAX_DIGITS + 1))
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# What a task id or parent task id may not hold: what forges or redraws a log
# line (_ids.LOG_UNSAFE, the baggage decoder's rule too) and lone surrogates,
# which a UTF-8 log handler cannot write (the record is lost).
_UNSAFE_TEXT_RE = re.compile(rf"[{LOG_UNSAFE}\ud800-\udfff]")
_MAX_TASK_ID = 255

# Causes already warned about: one warning per cause per process.
_warned: Set[str] = set()


def header_limit(max_store_bytes: int) -> int:
    """The longest header (in characters) a worker reads: room for the
    request store and 15 named stores of ``max_store_bytes`` each."""
    return 16 * max_store_bytes


# -- publishing ------------------------------------------------------------------

class _Refused(Exception):
    """Raised inside :func:`_precheck` to stop at the first reason."""


def _precheck(store: object, limit: int) -> None:
    """Raise :class:`_Refused` if *store* cannot be at most *limit* bytes of
    JSON within :data:`MAX_DEPTH`, or is not JSON; cost ``O(limit)``.

    Counts a lower bound of the encoded size (every string's length, every
    container's brackets, a number's digits) and stops as soon as it passes
    *limit*: a container's length is checked before it is walked, so a list
    of five million items is refused at once.
    """
    size = 0
    path: List[int] = []

    def walk(value: object, depth: int) -> None:
        nonlocal size
        if isinstance(value, str):
            size += len(value) + 2  # quotes; escapes only add
        elif value is None or value is True or value is False:
            size += 4  # null, true, false
        elif isinstance(value, float):
            size += 3  # repr(float) has at least "0.0"
        elif isinstance(value, int):
            # An int of b bits has at least floor((b - 1) * log10(2)) + 1 digits.
            size += (max(value.bit_length() - 1, 0) * 3) // 10 + 1
        elif isinstance(value, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                raise _Refused(f"it nests more than {MAX_DEPTH} containers")
            if id(value) in path:
                raise _Refused("it contains itself (a circular reference)")
            # Brackets and commas; each item is at least one more byte: a
            # container too long for the limit is refused before it is walked.
            size += 1 + len(value)
            if size + len(value) > limit:
                raise _Refused(f"it is over max_store_bytes={limit} as JSON")
            path.append(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, str):
                        size += len(key) + 3  # quotes and colon
                    elif key is None or isinstance(key, (int, float)):
                        size += 4  # '"1":' at least
                    else:
                        raise _Refused(f"a key of type {type(key).__name__!r} is not "
                                       f"JSON-serialisable")
                    walk(item, depth + 1)
            else:
                for item in value:
                    walk(item, depth + 1)
            path.pop()
        else:
            raise _Refused(f"an object of type {type(value).__name__!r} is not "
                           f"JSON-serialisable")
        if size > limit:
            raise _Refused(f"it is over max_store_bytes={limit} as JSON")

    walk(store, 0)


def encode_store(store: object, max_store_bytes: int) -> Tuple[Optional[str], str]:
    """``(json_text, "")`` for a store that may travel, else ``(None, reason)``.

    Never raises. The text is compact JSON of at most *max_store_bytes*
    UTF-8 bytes; a store over the limit is refused after ``O(max_store_bytes)``
    work, never encoded whole.
    """
    try:
        _precheck(store, max_store_bytes)
        text = json.dumps(store, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except _Refused as exc:
        return None, str(exc)
    except UnicodeEncodeError:
        return None, "it holds text that is not valid Unicode (a lone surrogate)"
    except RecursionError:  # the publisher's own stack was nearly full
        return None, "encoding it hit the recursion limit"
    except Exception as exc:  # what json.dumps refuses: NaN, a failing __iter__ ...
        return None, f"json.dumps refused it ({type(exc).__name__}: {exc})"
    if size > max_store_bytes:
        return None, f"it is {size} bytes as JSON, over max_store_bytes={max_store_bytes}"
    return text, ""


def join_header(request_text: Optional[str], named: List[Tuple[str, str]],
                parent: Any = None, with_parent: bool = False) -> Optional[str]:
    """The header from already-encoded parts, or ``None`` when there are none."""
    parts: List[str] = []
    if request_text is not None:
        parts.append(f'"r":{request_text}')
    if named:
        parts.append('"s":{' + ",".join(f"{json.dumps(name)}:{text}" for name, text in named)
                     + "}")
    if with_parent:
        parts.append(f'"p":{json.dumps(parent)}')
    if not parts:
        return None
    return "{" + ",".join(parts) + "}"


# -- running ---------------------------------------------------------------------

def _warn_once(cause: str, message: str, *args: Any) -> None:
    if cause not in _warned:
        _warned.add(cause)
        _log.warning("asl_gevent.celery: " + message + "; warned once per cause", *args)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """``parse_float``: ``1e999`` would be ``inf``, which cannot be re-encoded
    as JSON for the task's continuations."""
    value = float(text)
    if not isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a float")
    return value


def task_id(value: object) -> Optional[str]:
    """*value* if it may stand in ``task_storage`` (and so in log lines) as a
    task id or parent task id, else ``None``: a str of 1 to 255 characters
    without C0/C1 control characters, DEL, U+2028/U+2029, bidi controls or
    lone surrogates.

    >>> task_id("7f8e-11"), task_id("x\\nCRITICAL forged"), task_id("\\ud800"), task_id(None)
    ('7f8e-11', None, None, None)
    """
    if (isinstance(value, str) and 0 < len(value) <= _MAX_TASK_ID
            and _UNSAFE_TEXT_RE.search(value) is None):
        return value
    return None


def _too_complex(header: str, max_depth: int) -> Optional[str]:
    """Why *header* must not reach :func:`json.loads`, or ``None``.

    Linear and in C but for one pass over the brackets: strings are cut out
    (a bracket or digit inside one does not count), then the digits and the
    nesting of what is left are measured.
    """
    if len(header) <= 1024 and header.count("[") + header.count("{") <= max_depth:
        return None  # cannot nest deeper or hold a number longer than the limit
    rest = _STRING_RE.sub('""', header)
    if _LONG_NUMBER_RE.search(rest) is not None:
        return f"holds a number of more than {_MAX_DIGITS} digits"
    brackets = _NOT_BRACKET_RE.sub("", rest)
    if len(brackets) > max_depth and max(accumulate(map(_DEPTH_STEP.__getitem__, brackets))) \
            > max_depth:
        return f"nests more than {max_depth} levels"
    return None


def decode(header: object, max_store_bytes: int = DEFAULT_MAX_STORE_BYTES
           ) -> Optional[Dict[str, Any]]:
    """The stores a message's ``asl_gevent`` header carries, checked; never raises.

    :param header: the header's value, as the broker delivered it (anything).
    :param max_store_bytes: the worker's limit; the header may be
        :func:`header_limit` characters long.
    :returns: ``None`` when the header is unusable (not a str, too long, too
        deep, not JSON, a non-finite number, not an object): the task then
        runs with no stores from it. Else a dict with the keys that passed
        their checks: ``"r"`` (a dict with a valid ``"request_id"``, and
        a ``"client_request_id"`` only if valid), ``"s"`` (a dict of name to store,
        without stores holding lone surrogates), ``"p"`` (a str passing
        :func:`task_id`, or ``None``). A part that fails is
        dropped alone. Each cause is warned about once per process.
    """
    try:
        return _decode(header, max_store_bytes)
    except Exception as exc:  # a bug of ours must not lose a task either
        _warn_once("error", "ignoring the %r header: %s: %s", "asl_gevent",
                   type(exc).__name__, exc)
        return None


def _decode(header: object, max_store_bytes: int) -> Optional[Dict[str, Any]]:
    if not isinstance(header, str):
        _warn_once("type", "ignoring an %r header of type %r, not a str; the task runs "
                   "with no stores from it", "asl_gevent", type(header).__name__)
        return None
    limit = header_limit(max_store_bytes)
    if len(header) > limit:
        _warn_once("size", "ignoring an %r header of %d characters, over %d "
                   "(16 x max_store_bytes); the task runs with no stores from it",
                   "asl_gevent", len(header), limit)
        return None
    why = _too_complex(header, MAX_DEPTH + 2)
    if why is not None:
        _warn_once("complex", "ignoring an %r header that %s; the task runs with no "
                   "stores from it", "asl_gevent", why)
        return None
    try:
        decoded = json.loads(header, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        _warn_once("json", "ignoring an %r header that is not valid JSON (%s); the task "
                   "runs with no stores from it", "asl_gevent", exc)
        return None
    if not isinstance(decoded, dict):
        _warn_once("shape", "ignoring an %r header that is a JSON %s, not an object; the "
                   "task runs with no stores from it", "asl_gevent", type(decoded).__name__)
        return None
    result: Dict[str, Any] = {}
    if "r" in decoded:
        request = _request_store(decoded["r"])
        if request is not None:
            result["r"] = request
    if "s" in decoded:
        named = decoded["s"]
        if isinstance(named, dict):
            result["s"] = {name: store for name, store in named.items()
                           if _is_text(name, store)}
        else:
            _warn_once("named", "dropping named stores that are a JSON %s, not an object",
                       type(named).__name__)
    if "p" in decoded:
        parent = decoded["p"]
        if parent is None or task_id(parent) is not None:
            result["p"] = parent
        else:
            _warn_once("parent", "dropping a parent task id that is neither null nor a string of "
                       "1 to 255 characters without control characters, U+2028/U+2029, "
                       "bidi controls or lone surrogates: %.80r", parent)
    return result


def _request_store(store: object) -> Optional[Dict[str, Any]]:
    """The request store, or ``None`` when its ``request_id`` does not pass
    the id rule. A ``client_request_id`` that does not pass it either is
    dropped alone: :class:`~asl_gevent.logfilter.StoreFilter` writes both
    into log lines, so neither may hold a line break. Other keys are the
    app's JSON values (as named stores are) and come back as sent."""
    if not (isinstance(store, dict) and _is_safe(store.get("request_id"))):
        _warn_once("request", "dropping a request store that is not "
                   "{\"request_id\": <a valid X-Request-ID>, ...}: %.80r", store)
        return None
    if REQUEST_KEYS[1] in store and not _is_safe(store[REQUEST_KEYS[1]]):
        _warn_once("request-keys", "dropping a client_request_id that is not a valid "
                   "X-Request-ID: %.80r", store[REQUEST_KEYS[1]])
        store = {key: value for key, value in store.items() if key != REQUEST_KEYS[1]}
    if not _is_text("request", store):  # a lone surrogate: its ids alone
        store = {key: store[key] for key in REQUEST_KEYS if key in store}
    return store


def _is_text(name: str, store: object) -> bool:
    """Whether a named store can be encoded again as UTF-8 JSON (for the
    task's continuations and its log lines): no lone surrogate in it or in
    its name. Linear, in C."""
    try:
        json.dumps({name: store}, ensure_ascii=False, allow_nan=False).encode("utf-8")
        return True
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        _warn_once("surrogate", "dropping a named store that holds a lone surrogate (not "
                   "valid Unicode): %.80r", name)
        return False
