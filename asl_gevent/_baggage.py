"""W3C ``baggage`` for named stores: encode on the way out, decode on the way in.

Shared by :mod:`asl_gevent.http` (sending) and :mod:`asl_gevent.wsgi`
(receiving); it needs no third-party library, so the middleware can restore
baggage without ``requests`` installed.

A storage named ``tenant`` travels as members of the header
(https://www.w3.org/TR/baggage/):

- a string store ``"acme"``                 -> ``tenant=acme``
- a flat mapping ``{"plan": "gold"}``        -> ``tenant.plan=gold``

Values are percent-encoded (UTF-8); names and keys must be RFC 7230 tokens.
The limits are the spec's: at most 180 members and 8192 bytes in all;
members past either limit are dropped whole (never cut in the middle).

>>> encode_members([("tenant", "acme corp"), ("user.role", "admin;x")])
('tenant=acme%20corp,user.role=admin%3Bx', 0)
>>> sorted(decode("tenant=acme%20corp, user.role = admin%3Bx;prop, bad key=1").items())
[('tenant', 'acme corp'), ('user.role', 'admin;x')]
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote, unquote

from ._ids import LOG_UNSAFE

__all__ = ["MAX_MEMBERS", "MAX_BYTES", "members_of", "encode_members", "decode", "store_from",
           "store_for"]

#: W3C Baggage, "Limits": at most 180 list-members ...
MAX_MEMBERS = 180
#: ... and at most 8192 bytes for all of them (the header value).
MAX_BYTES = 8192

# RFC 7230 token: what a baggage key may be.
TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# baggage-octet minus '%' (the escape itself): printable ASCII except
# space, DQUOTE, ',', ';' and '\'. quote() escapes everything else.
_SAFE = "!#$&'()*+-./:<=>?@[]^_`{|}~"


def members_of(name: str, store: Any) -> Optional[List[Tuple[str, str]]]:
    """The (key, value) members for *store* of the storage called *name*.

    ``None`` when the store is neither a str nor a flat mapping of
    token-named str keys to str values (the caller warns once).
    """
    if isinstance(store, str):
        return [(name, store)]
    if isinstance(store, Mapping):
        members = []
        for key, value in store.items():
            if not (isinstance(key, str) and isinstance(value, str)
                    and TOKEN_RE.fullmatch(key)):
                return None
            members.append((f"{name}.{key}", value))
        return members
    return None


def encode_members(members: Iterable[Tuple[str, str]]) -> Tuple[str, int]:
    """Join *members* into one header value; return it and how many were dropped."""
    parts: List[str] = []
    size = 0
    dropped = 0
    for key, value in members:
        part = f"{key}={quote(value, safe=_SAFE)}"
        # +1 for the comma that joins this member to the previous one.
        added = len(part) + (1 if parts else 0)
        if len(parts) >= MAX_MEMBERS or size + added > MAX_BYTES:
            dropped += 1
            continue
        parts.append(part)
        size += added
    return ",".join(parts), dropped


# W3C baggage-octet: what a raw (still percent-encoded) value may hold.
# Anything else -- a space inside, a raw control character, a raw byte past
# 0x7E -- makes the member malformed, and it is dropped.
_VALUE_RE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# What a restored value may not hold once percent-decoded: a character that
# forges or redraws a log line (_ids.LOG_UNSAFE: controls, line separators,
# bidi controls).
_CONTROL_RE = re.compile(f"[{LOG_UNSAFE}]")


def decode(header: str) -> Dict[str, str]:
    """Parse a ``baggage`` header value into ``{key: value}``.

    Client input: members with a malformed key or value are skipped, and so
    are members whose percent-decoded value holds a control character (C0,
    DEL, C1, U+2028/U+2029, a bidi control); properties (after ``;``) are ignored. The work is
    bounded by the spec's limits, not by the header: only the first 8,192
    characters are looked at (a member that runs past them is dropped whole)
    and at most 180 members, so a 6 MB header costs what an 8 KB one does.
    Never raises.

    .. versionchanged:: 0.3 bounded before reading; control characters
       (and bidi controls) dropped.
    """
    found: Dict[str, str] = {}
    if not isinstance(header, str):
        return found
    if len(header) > MAX_BYTES:
        # Slice first: nothing past the limit is split, copied or decoded.
        head = header[:MAX_BYTES + 1]
        head = head[:head.rfind(",") + 1] if head[-1] != "," else head
    else:
        head = header
    members = head.split(",", MAX_MEMBERS)
    for member in members[:MAX_MEMBERS]:
        key, sep, value = member.split(";", 1)[0].partition("=")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not sep or TOKEN_RE.fullmatch(key) is None or _VALUE_RE.fullmatch(value) is None:
            continue
        try:
            value = unquote(value, errors="strict")
        except UnicodeDecodeError:
            continue
        if _CONTROL_RE.search(value) is not None:
            continue
        found[key] = value
    return found


def store_from(name: str, members: Mapping[str, str]) -> Union[str, Dict[str, str], None]:
    """The store for the storage called *name* from decoded *members*, or ``None``.

    The shape follows the members (0.2); the middleware uses :func:`store_for`,
    where the application declares it.
    """
    if name in members:
        return members[name]
    return store_for(name, dict, members)


def store_for(name: str, shape: type, members: Mapping[str, str]) -> Union[str, Dict[str, str], None]:
    """The store of *shape* for the storage called *name*, or ``None``.

    *shape* ``str``: the member ``name=value`` gives ``"value"``.
    *shape* ``dict``: members ``name.key=value`` give ``{"key": "value", ...}``
    (always a new dict of str to str). Members of the other shape are ignored:
    the client never chooses the store's type.

    .. versionadded:: 0.3
    """
    if shape is str:
        return members.get(name)
    prefix = name + "."
    mapping = {key[len(prefix):]: value for key, value in members.items()
               if key.startswith(prefix) and len(key) > len(prefix)}
    return mapping or None
