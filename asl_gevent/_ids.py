"""Request ids: which incoming ids are adopted, and how new ones are made.

Plain functions over a header value and the WSGI environ, with no knowledge
of responses, so that the middleware, :mod:`asl_gevent.http` and
:mod:`asl_gevent.celery` apply one rule:

>>> is_safe("req-42"), is_safe("a b"), is_safe("x" * 129)
(True, False, False)
>>> len(generate()), generate() != generate()
(32, True)
>>> trusting = trust_from(["10.0.0.0/8"], "example")
>>> trusting({"REMOTE_ADDR": "10.1.2.3"}), trusting({"REMOTE_ADDR": "192.0.2.1"})
(True, False)

.. versionadded:: 0.3
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Union

__all__ = ["ID_RE", "HEADER_NAME_RE", "is_safe", "generate", "id_of", "environ_key",
           "incoming_id", "trust_from", "check_validator", "check_generator"]

_log = logging.getLogger("asl_gevent.wsgi")

# Ids come from clients and end up in logs and response headers: bound their
# length and allow only characters that are harmless in both (no spaces, no
# quotes, no control characters, no CR/LF that could split a header).
ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

# Header names we read ids from and echo them in: letters, digits and '-'.
# Not every RFC 7230 token character: WSGI maps '-' and '_' to the same
# environ key (HTTP_X_REQUEST_ID), and proxies such as nginx drop header
# names with '_' by default, so 'X_Request_ID' would either never arrive or
# be spoofable through its '-' twin. 0.2 accepted any token although its error
# text said "letters, digits, '-'".
HEADER_NAME_RE = re.compile(r"[A-Za-z0-9-]+")

#: What text from outside (a baggage value, a task id) may not hold once it
#: can reach a log line, as a regular-expression character range: C0
#: controls (CR, LF, NUL, ESC ...), DEL, C1 controls (NEL ...) and the Unicode
#: line and paragraph separators, any of which starts a new, forged line in a
#: log or a terminal (issue 14: "tenant.plan=gold%0AINFO [admin] ..."), and
#: the Unicode bidirectional controls (U+061C, U+200E/F, U+202A-E, U+2066-9;
#: the "Trojan Source" set, CVE-2021-42574), with which a value makes a log
#: viewer draw the rest of its line, the fields after it included, in another
#: order than it was written. Zero-width characters (U+200B, the joiners,
#: U+FEFF) only change how the value itself looks: allowed.
LOG_UNSAFE = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"

Trust = Union[Callable[[Mapping[str, Any]], bool], Iterable[Any], None]


def is_safe(value: object) -> bool:
    """True if *value* is a str of 1 to 128 characters from ``A-Z a-z 0-9 . _ : @ / + = -``."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def environ_key(header: str) -> str:
    """The WSGI environ key of request header *header* (``X-Request-ID`` -> ``HTTP_X_REQUEST_ID``)."""
    return "HTTP_" + header.upper().replace("-", "_")


def id_of(store: object) -> Optional[str]:
    """The ``request_id`` of a store (mapping key or attribute) if it is a str, else ``None``."""
    if type(store) is dict:
        # The middleware's own store, checked first: isinstance() against
        # typing.Mapping runs Python frames. get_request_id(): ~6,900 -> ~2,000
        # instructions per call (callgrind, CPython 3.11).
        value = store.get("request_id")
    elif store is None:
        return None
    elif isinstance(store, Mapping):
        value = store.get("request_id")
    else:
        value = getattr(store, "request_id", None)
    return value if isinstance(value, str) else None


def incoming_id(environ: Mapping[str, Any], key: str) -> Optional[str]:
    """The id a client sent under environ *key*, stripped of spaces and tabs,
    if it is safe (:func:`is_safe`); else ``None``. Says nothing about trust."""
    value = environ.get(key)
    if isinstance(value, str):
        value = value.strip(" \t")
        if ID_RE.fullmatch(value) is not None:
            return value
    return None


# -- generating -----------------------------------------------------------------

# uuid4's version and variant bits, applied by hand: the same ids as
# ``uuid.uuid4().hex`` at half the cost (measured 1.0us vs 2.1us, CPython 3.11).
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)

# The 122 random bits come from a private Mersenne Twister seeded from
# os.urandom, not from os.urandom per id: a getrandom() system call per id was
# a third of the middleware's cost (callgrind, CPython 3.11: 6,400
# instructions plus the system call per id, against 3,800 and none). Private,
# so an application's random.seed() never makes two processes repeat ids.
#
# Unique after ANY fork: os.register_at_fork reseeds children that Python
# forks (gunicorn, multiprocessing), but uWSGI's default preforking forks
# from C and runs no at-fork handler (unless --py-call-osafterfork): 0.2's
# workers then shared one stream and ~140 of 300 ids repeated across two
# workers and their recycled successors. So every id also compares the pid
# with the one the generator was seeded in (os.getpid() is one cheap system
# call; ~150 instructions per id under callgrind) and reseeds on a mismatch.
# The pid is recorded after seeding, so a thread that sees the new pid draws
# from the new seed. getrandbits() and list.pop() are single C calls under
# the GIL: thread-safe.
#
# Not unpredictable: Mersenne Twister output can be reconstructed from a few
# hundred ids. Ids are correlation ids, not secrets; pass
# generator=secrets.token_hex (or uuid4) to the middleware if yours must be.
_random = random.Random()
_bits = _random.getrandbits
_getpid = os.getpid
_seeded_in = _getpid()

# Ids are made 256 at a time: one getrandbits() call and one mask over a
# 32,768-bit int, one hex(), then slices; an id then costs a list.pop()
# (callgrind, CPython 3.11: ~3,800 instructions per id one at a time, ~900
# in batches). The pool is emptied whenever the pid changes, so a forked
# child never hands out ids its parent had already made.
_BATCH = 256
_BATCH_CLEAR = sum(_UUID4_CLEAR % (1 << 128) << (128 * n) for n in range(_BATCH))
_BATCH_SET = sum(_UUID4_SET << (128 * n) for n in range(_BATCH))
_pool: list[str] = []
_pool_pop = _pool.pop


def _reseed() -> None:
    global _seeded_in
    _pool.clear()
    _random.seed()  # from os.urandom
    _seeded_in = _getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def _refill() -> str:
    if _getpid() != _seeded_in:
        _reseed()
    digits = ((_bits(128 * _BATCH) & _BATCH_CLEAR) | _BATCH_SET).to_bytes(16 * _BATCH, "big").hex()
    if _getpid() != _seeded_in:  # forked while we were making them
        return _refill()
    _pool.extend([digits[i:i + 32] for i in range(32, 32 * _BATCH, 32)])
    return digits[:32]


def generate() -> str:
    """A new random (version 4) UUID as 32 hex digits, like ``uuid.uuid4().hex``.

    Unique across threads and processes however they were forked (a child
    whose pid differs from the seeding process reseeds from ``os.urandom``
    and drops the ids made before the fork); not unpredictable (see the
    module source).
    """
    if _getpid() == _seeded_in:
        try:
            return _pool_pop()
        except IndexError:
            pass
    return _refill()


# -- checking the policy arguments ---------------------------------------------


def check_validator(validator: Any, where: str) -> Optional[Callable[[str], bool]]:
    """``validator=``: ``None`` or a callable ``validator(id) -> bool``."""
    if validator is not None and not callable(validator):
        raise TypeError(f"{where} argument 'validator' must be callable or None, not "
                        f"{type(validator).__name__!r}; e.g. validator=lambda id: len(id) == 32")
    return validator  # type: ignore[no-any-return]


def check_generator(generator: Any, where: str) -> Optional[Callable[[], str]]:
    """``generator=``: ``None`` or a callable ``generator() -> str``."""
    if generator is not None and not callable(generator):
        raise TypeError(f"{where} argument 'generator' must be callable or None, not "
                        f"{type(generator).__name__!r}; e.g. generator=secrets.token_hex")
    return generator  # type: ignore[no-any-return]


def trust_from(trust: Trust, where: str) -> Optional[Callable[[Mapping[str, Any]], bool]]:
    """``trust=``: ``None`` (trust every client, as 0.2 did), a predicate
    ``trust(environ) -> bool``, or an iterable of networks (``"10.0.0.0/8"``,
    ``"::1"``, :class:`ipaddress.IPv4Network` ...) that ``REMOTE_ADDR`` must
    fall in. Returns ``None`` or a predicate over the environ."""
    if trust is None:
        return None
    if callable(trust):
        return trust
    if isinstance(trust, (str, bytes)) or not isinstance(trust, Iterable):
        raise TypeError(f"{where} argument 'trust' must be a callable trust(environ) -> bool, "
                        f"a list of networks or None, not {type(trust).__name__!r}; "
                        f"e.g. trust=['10.0.0.0/8', '127.0.0.1']")
    networks = []
    for item in trust:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            networks.append(item)
            continue
        if not isinstance(item, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise TypeError(f"{where} argument 'trust' must hold networks (str or "
                            f"ipaddress objects), not {type(item).__name__!r}; "
                            f"e.g. trust=['10.0.0.0/8']")
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{where} argument 'trust' holds {item!r}, which is not an IP "
                             f"network; e.g. trust=['10.0.0.0/8', '::1']") from None
    return _RemoteAddrIn(tuple(networks))


class _RemoteAddrIn:
    """``REMOTE_ADDR`` is in one of *networks* (an unparsable address is not)."""

    __slots__ = ("networks",)

    def __init__(self, networks: tuple[Any, ...]) -> None:
        self.networks = networks

    def __call__(self, environ: Mapping[str, Any]) -> bool:
        remote = environ.get("REMOTE_ADDR")
        if not isinstance(remote, str) or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"<trust REMOTE_ADDR in {[str(n) for n in self.networks]}>"
