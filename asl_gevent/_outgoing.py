"""The one decision every outgoing-HTTP hook asks: which headers go to this URL.

:mod:`asl_gevent._http_clients` has one small hook per client (http.client,
urllib3, requests, httpx); each asks :func:`decide` for the headers of the
request it is about to send, then adds those the caller did not set. All the
rules live here, so every client follows the same ones:

- outside a request store nothing is added (and nothing more is computed);
- ``targets`` (:class:`Targets`) limit the hosts/URLs that get anything;
- a header the caller removed for one call (requests' ``headers={name: None}``,
  recorded in :data:`OPTED_OUT` by the requests hook) is not added back;
- an id the middleware would reject is not sent (warned once);
- each baggage storage is encoded on its own: one that cannot be encoded
  (a lone surrogate), has the wrong shape, or is too big for the W3C limits
  is left out alone (warned once per storage), without encoding all of it;
- :func:`decide` never raises: any error in the decision is one warning and
  no headers, and the caller's call proceeds exactly as without the hook.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from itertools import islice
from typing import (Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional,
                    Tuple)
from urllib.parse import quote

from . import _baggage
from ._storage import AsyncLocalStorage
from ._ids import ID_RE as _ID_RE
from ._ids import id_of as _id_of
from .wsgi import _OUTGOING, request_storage

__all__ = ["Config", "Targets", "OPTED_OUT", "DECIDED", "PROXIED", "URL", "CONNECTION",
           "BOTH", "configure", "decide", "headers_for_url"]

_log = logging.getLogger("asl_gevent.http")

#: How a hook's request-target tells where the request goes (the last item
#: of :data:`Where`):
#:
#: - ``URL``: the request-target is an absolute URL and it is where the
#:   request goes (:func:`headers_for_url`; a request through a forward proxy
#:   the client is known to use: urllib3's proxy pools, urllib.request's
#:   ``ProxyHandler``); anything else matches nothing;
#: - ``CONNECTION``: the request goes to the connection's host and port, which
#:   the client chose itself (a urllib3 pool without a proxy, httpx); an
#:   absolute-form request-target only gives the path for URL patterns;
#: - ``BOTH``: the connection may or may not be a forward proxy (a bare
#:   http.client connection): its host and port must be a target, and so must
#:   the host of an absolute-form request-target when it names another place.
URL, CONNECTION, BOTH = 0, 1, 2

#: ``(scheme, host, port, request-target, how)`` of a request, as a hook sees
#: it: the place the connection goes to, the target it sends (a path ``/a?b``,
#: or an absolute URL), and how to read them (:data:`URL`, :data:`CONNECTION`,
#: :data:`BOTH`).
Where = Tuple[str, str, Optional[int], str, int]

#: The absolute URL urllib.request is fetching through an HTTP forward proxy
#: (its ``ProxyHandler``), set by the urllib.request hook around
#: ``AbstractHTTPHandler.do_open``: the http.client connection it opens goes
#: to the proxy, and a request-target equal to this is the URL fetched.
PROXIED: ContextVar[Optional[str]] = ContextVar("asl_gevent.http.proxied", default=None)

#: Lower-case header names the caller removed for the call in progress
#: (requests: ``headers={"X-Request-ID": None}`` or a session header set to
#: None). Set by the requests hook around ``Session.request`` only when there
#: is such a header, so the common call pays one ``get``.
OPTED_OUT: ContextVar[FrozenSet[str]] = ContextVar("asl_gevent.http.opted_out")

#: Set while a hook that decided for this request runs it (urllib3's
#: ``urlopen``): the layer below (http.client, which urllib3's connections
#: are) passes through, so a request never gets the header twice and never
#: one the upper layer decided against. The value is the headers that hook
#: added (``True`` when none): urllib3 following a redirect on one pool calls
#: ``urlopen`` again with them, and that hop takes them off and decides anew.
DECIDED: ContextVar[Any] = ContextVar("asl_gevent.http.decided", default=False)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_HEADERS: Dict[str, str] = {}


class Targets:
    """Where ids and baggage may go: host names, domains, URL patterns.

    - ``"api.internal"``: that host, any port (case-insensitive, a trailing
      dot ignored; an IPv6 address without brackets);
    - ``"api.internal:8443"``: that host on that port only;
    - ``".example.com"``: ``example.com`` and every subdomain of it;
    - ``re.compile(...)``: searched in the request's URL, written
      ``scheme://host[:port]/path?query`` (the port only when it is not the
      scheme's default, the host in lower case).

    An absolute URL matches only if it is ``http``/``https`` with a
    well-formed RFC 3986 authority (``_AUTHORITY_RE``); which host
    it names counts as :data:`Where` says.
    """

    __slots__ = ("hosts", "host_ports", "domains", "patterns")

    def __init__(self, items: Iterable[Any], where: str) -> None:
        self.hosts: set[str] = set()
        self.host_ports: set[Tuple[str, int]] = set()
        domains: List[str] = []
        patterns: List["re.Pattern[str]"] = []
        for item in items:
            if isinstance(item, re.Pattern):
                if not isinstance(item.pattern, str):
                    raise TypeError(f"{where} argument 'targets': {item!r} is a bytes "
                                    f"pattern; use a str one, e.g. re.compile(r'^https://api\\.')")
                patterns.append(item)
            elif isinstance(item, str):
                self._add_host(item, domains, where)
            else:
                raise TypeError(f"{where} argument 'targets' must hold host names (str) or "
                                f"compiled URL patterns (re.Pattern), not "
                                f"{type(item).__name__!r}; e.g. targets=['api.internal', "
                                f"'.svc.cluster.local', re.compile(r'^https://billing\\.')]")
        self.domains = tuple(domains)
        self.patterns = tuple(patterns)

    def _add_host(self, item: str, domains: List[str], where: str) -> None:
        text = item.strip().lower()
        # "." (or "..") named every host before 0.3's release: a domain with
        # no name is a mistake, refused like any other non-host.
        if (not text.strip(".") or "/" in text or "*" in text
                or any(c.isspace() for c in text)):
            raise ValueError(
                f"{where} argument 'targets': {item!r} is not a host name; give a host "
                f"('api.internal', 'api.internal:8443'), a domain and its subdomains "
                f"('.example.com'), or a URL pattern as re.compile(r'^https://api\\.example\\.com/')")
        if text.startswith("."):
            domains.append("." + _target_host(text[1:].rstrip("."), item, where))
            return
        host, port = text, None
        if text.startswith("["):  # [::1] or [::1]:8080
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else (None if not rest else "?")
        elif text.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
            host, port = text.split(":")
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{where} argument 'targets': {item!r} has a bad port; "
                                 f"e.g. 'api.internal:8443'")
            self.host_ports.add((_target_host(host.rstrip("."), item, where), int(port)))
        else:
            self.hosts.add(_target_host(host.rstrip("."), item, where))

    def match(self, scheme: str, host: str, port: Optional[int], target: str,
              how: int) -> bool:
        """Whether a request to this place may carry ids and baggage (see :data:`Where`)."""
        if target[:1] == "/" or target == "*":  # origin-form: the connection's place
            return how != URL and self._allows(_normal(scheme, host, port, target))
        url = _split_url(target)
        if url is None:  # not an http(s) URL with a well-formed authority
            return False
        if how == URL:
            return self._allows(url)
        connection = _normal(scheme, host, port, url[3])
        if not self._allows(connection):
            return False
        return how == CONNECTION or url[1:3] == connection[1:3] or self._allows(url)

    def _allows(self, place: Tuple[str, str, Optional[int], str]) -> bool:
        scheme, host, port, target = place
        if not host or ("%" in host and ":" not in host):
            # A percent-escape in a host name: no DNS name has one, and a
            # proxy that decodes "evil.com%2f.svc.local" fetches evil.com,
            # although the text ends with ".svc.local". (An IPv6 zone,
            # "fe80::1%eth0", has colons.)
            return False
        if host in self.hosts or (host, port) in self.host_ports:
            return True
        for domain in self.domains:  # ".example.com"
            if host.endswith(domain) or host == domain[1:]:
                return True
        if self.patterns:
            url = _url(scheme, host, port, target)
            return any(pattern.search(url) for pattern in self.patterns)
        return False


#: ``scheme://authority rest``: the authority is everything up to the first
#: ``/``, ``?`` or ``#`` (RFC 3986, section 3.2).
_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
#: An RFC 3986 authority: ``[userinfo@]host[:port]``, with only the characters
#: it allows (unreserved, percent-encoded, sub-delims; ``:`` in userinfo; an
#: IP literal in brackets; a host name may be Unicode, an IRI's, which is
#: then IDNA-encoded and must come out a host name). A backslash, a space, a second ``@``, anything
#: else: not one, so the URL gets nothing (clients disagree on such URLs:
#: ``http://127.0.0.1\@localhost/`` (one backslash) is localhost to urlsplit, 127.0.0.1 to
#: urllib3).
_AUTHORITY_RE = re.compile(
    r"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=:]|%[0-9A-Fa-f]{2})*@)?"
    r"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=\x80-\U0010ffff]|%[0-9A-Fa-f]{2})+)"
    r"(?::([0-9]*))?")


def _split_url(url: str) -> Optional[Tuple[str, str, Optional[int], str]]:
    """``(scheme, host, port, path?query)`` of an absolute http(s) URL whose
    authority is well-formed (RFC 3986), normalised; else None."""
    parts = _URL_RE.fullmatch(url)
    if parts is None or parts.group(1).lower() not in _DEFAULT_PORTS:
        return None
    authority = _AUTHORITY_RE.fullmatch(parts.group(2))
    if authority is None:
        return None
    digits = authority.group(2)
    port = int(digits) if digits else None
    if port is not None and port > 65535:
        return None
    rest = parts.group(3).partition("#")[0]
    return _normal(parts.group(1), authority.group(1), port,
                   rest if rest.startswith("/") else "/" + rest)


def _normal(scheme: str, host: str, port: Optional[int],
            target: str) -> Tuple[str, str, Optional[int], str]:
    """A place: lower-case scheme and host, the host without brackets or a
    trailing dot, the scheme's default port when none is given."""
    scheme = scheme.lower()
    host = host.lower().strip("[]").rstrip(".")
    if not host.isascii():
        host = _ascii_host(host)
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return scheme, host, port, target


def _target_host(host: str, item: str, where: str) -> str:
    """A target's host as _normal spells hosts: "bücher.de" as requests and
    urllib3 send it, so one spelling matches whichever the client used."""
    if host.isascii():
        return host
    ascii_host = _ascii_host(host)
    if not ascii_host:
        raise ValueError(f"{where} argument 'targets': {item!r} is not a host name IDNA "
                         f"can encode; e.g. 'xn--bcher-kva.de' for 'bücher.de'")
    return ascii_host


def _ascii_host(host: str) -> str:
    """*host* (lower case, non-ASCII) in IDNA's ASCII form, as requests and
    urllib3 send it (``bücher.de`` -> ``xn--bcher-kva.de``; httpx keeps the
    Unicode form in ``url.host``); ``""`` (matches nothing) if it cannot be."""
    try:
        import idna  # what requests and urllib3 use (IDNA 2008, UTS 46)
        ascii_host = str(idna.encode(host, uts46=True).decode("ascii"))
    except ImportError:
        try:
            ascii_host = host.encode("idna").decode("ascii")  # IDNA 2003, the stdlib's
        except UnicodeError:
            return ""
    except Exception:  # idna.IDNAError, UnicodeError: not a host name
        return ""
    # IDNA 2003 maps a fullwidth solidus to "/": "evil.com\uff0f.svc.local"
    # must not come out ending with ".svc.local".
    return ascii_host.lower().rstrip(".") if _ASCII_HOST_RE.fullmatch(ascii_host) else ""


_ASCII_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")


def _url(scheme: str, host: str, port: Optional[int], target: str) -> str:
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{target}"


class Config:
    """What :func:`asl_gevent.http.install` was given."""

    __slots__ = ("header", "storage", "baggage", "targets", "warned")

    def __init__(self, header: Optional[str], storage: Optional[AsyncLocalStorage[Any]],
                 baggage: Tuple[AsyncLocalStorage[Any], ...],
                 targets: Optional[Targets]) -> None:
        self.header = header
        self.storage = storage
        self.baggage = baggage
        #: None: everywhere.
        self.targets = targets
        #: Keys already warned about: "id", "error", "baggage-limit", and each
        #: baggage storage's name. Once each per install().
        self.warned: set[str] = set()


# Kept across importlib.reload (the hooks read it through this module).
if "_config" not in globals():
    _config = Config(None, None, (), None)


def configure(config: Config) -> None:
    global _config
    _config = config


def decide(where: Optional[Callable[..., Where]], *args: Any) -> Dict[str, str]:
    """The headers for the request ``where(*args)`` describes. Never raises.

    *where* is called only when targets are configured and there is
    something to send, so a call outside a request costs a store lookup.
    ``where=None``: for anywhere (targets are not checked). The dict
    returned may be shared: do not change it. One function, not two: this
    runs on every outgoing call, and a Python frame costs ~1,500
    instructions (callgrind, CPython 3.11).
    """
    config = _config
    try:
        storage = config.storage
        header = config.header
        middleware = _OUTGOING.get(None)
        if middleware is not None:
            storage = storage or middleware[0]
            header = header or middleware[1]
        store = (storage or request_storage).get_store()
        if type(store) is dict:  # the middleware's own store: no Mapping isinstance (3 frames)
            request_id = store.get("request_id")
            if type(request_id) is not str:
                request_id = None
        else:
            request_id = _id_of(store)
        if request_id is None and not config.baggage:
            return _NO_HEADERS
        if (where is not None and config.targets is not None
                and not config.targets.match(*where(*args))):
            return _NO_HEADERS
        header = header or "X-Request-ID"
        opted_out = OPTED_OUT.get(None)
        headers: Dict[str, str] = {}
        if request_id is not None and (opted_out is None or header.lower() not in opted_out):
            if _ID_RE.fullmatch(request_id) is not None:
                headers[header] = request_id
            else:
                _warn_once(config, "id", "not sending request id %r: the middleware would "
                           "reject it (1-128 of A-Z a-z 0-9 . _ : @ / + = -); warned once",
                           request_id[:200])
        if config.baggage and (opted_out is None or "baggage" not in opted_out):
            value = _baggage_value(config)
            if value:
                headers["baggage"] = value
        return headers
    except Exception as exc:
        _warn_once(config, "error", "not adding request id/baggage to an outgoing request: "
                   "%s: %s; the request is sent as it would be without asl_gevent.http; "
                   "warned once", type(exc).__name__, exc)
        return _NO_HEADERS


def headers_for_url(url: Optional[str]) -> Dict[str, str]:
    """:func:`decide` for a URL given as a string (or for anywhere: None)."""
    if url is None:
        return dict(decide(None))
    return dict(decide(_where_url, url))


def _where_url(url: str) -> Where:
    return "", "", None, url, URL


def _baggage_value(config: Config) -> str:
    """The ``baggage`` header for the storages' current stores, within the W3C limits.

    Each storage is encoded on its own: one that cannot be (wrong shape, a
    value that is not UTF-8 encodable, a store bigger than the whole header
    may be) is left out alone with one warning, and is never encoded in full.
    """
    parts: List[str] = []
    size = 0
    dropped = 0
    for storage in config.baggage:
        try:
            store = storage.get_store()
            if store is None or store is storage.default:
                continue
            room = max(_baggage.MAX_MEMBERS - len(parts), 0)
            if isinstance(store, Mapping) and len(store) > room:
                # Only the members that can still fit are looked at: a
                # mapping of a million keys costs what 180 cost.
                dropped += len(store) - room
                store = dict(islice(store.items(), room))
            members = _baggage.members_of(storage.name, store)
        except Exception as exc:  # a get_store() override, an exotic mapping
            _warn_once(config, storage.name, "not sending %r as baggage: reading its store "
                       "failed (%s: %s); warned once", storage, type(exc).__name__, exc)
            continue
        if members is None:
            _warn_once(config, storage.name, "not sending %r as baggage: its store is "
                       "a %s, not a str or a flat mapping of str to str; warned once",
                       storage, type(store).__name__)
            continue
        if len(members) > room:  # a str store with no room left
            dropped += len(members) - room
            members = members[:room]
        encoded: List[str] = []
        for key, value in members:
            if len(key) + 1 + len(value) > _baggage.MAX_BYTES:
                encoded.append("")  # cannot fit whatever it encodes to: not encoded
                continue
            try:
                encoded.append(f"{key}={quote(value, safe=_baggage._SAFE)}")
            except UnicodeEncodeError as exc:  # a lone surrogate (os.fsdecode of a bad name)
                _warn_once(config, storage.name, "not sending %r as baggage: %s is not "
                           "UTF-8 encodable (%s); warned once", storage, key, exc.reason)
                break
        else:
            for part in encoded:
                added = len(part) + (1 if parts else 0)
                if not part or size + added > _baggage.MAX_BYTES:
                    dropped += 1
                    continue
                parts.append(part)
                size += added
    if dropped:
        _warn_once(config, "baggage-limit", "dropped %d baggage members over the W3C "
                   "limits (%d members, %d bytes); warned once",
                   dropped, _baggage.MAX_MEMBERS, _baggage.MAX_BYTES)
    return ",".join(parts)


def _warn_once(config: Config, key: str, message: str, *args: Any) -> None:
    if key not in config.warned:
        config.warned.add(key)
        _log.warning(message, *args)
