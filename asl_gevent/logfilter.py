"""Put store fields on log records: a :mod:`logging` filter and a structlog processor.

:class:`StoreFilter` copies fields of the current store (by default the
``request_id`` of :data:`asl_gevent.wsgi.request_storage`) onto every record
it sees, so a format string can use ``%(request_id)s``. Because the hooks
copy the context into spawned greenlets and pool tasks, records logged there
carry the id of the request that started them:

>>> import logging, sys
>>> from asl_gevent import AsyncLocalStorage
>>> from asl_gevent.logfilter import StoreFilter
>>> als = AsyncLocalStorage(name="doc")
>>> handler = logging.StreamHandler(sys.stdout)
>>> handler.addFilter(StoreFilter(als))
>>> handler.setFormatter(logging.Formatter("[%(request_id)s] %(message)s"))
>>> log = logging.getLogger("doc"); log.addHandler(handler); log.propagate = False
>>> als.run({"request_id": "abc"}, log.warning, "inside")
[abc] inside
>>> log.warning("outside")
[-] outside

From :func:`logging.config.dictConfig`, name the storage by its dotted path::

    "filters": {"request": {
        "()": "asl_gevent.logfilter.StoreFilter",
        "storage": "myapp.context:request_storage",
        "fields": ["request_id", "user"],
    }}

Neither the filter nor the processor ever raises into the code that logs: a
store whose attribute access fails gives the placeholder, and the failure is
reported once per filter on the ``asl_gevent.logfilter`` logger.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import pkgutil
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Tuple, Union

from ._storage import AsyncLocalStorage

__all__ = ["StoreFilter", "store_processor"]

_log = logging.getLogger(__name__)

StorageSpec = Union[AsyncLocalStorage[Any], str, None]

# Attributes every LogRecord has (and "message"/"asctime", set by formatters):
# a field named like one of them would never be set, because the filter does
# not overwrite what a record already has.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _resolve_storage(storage: StorageSpec, where: str) -> AsyncLocalStorage[Any]:
    """Turn the ``storage`` argument into an :class:`AsyncLocalStorage`."""
    if storage is None:
        # Imported here so that using the filter with your own storage does
        # not need the WSGI module.
        from .wsgi import request_storage
        return request_storage
    if isinstance(storage, str):
        try:
            resolved = pkgutil.resolve_name(storage)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"{where} argument 'storage' names {storage!r}, which cannot be "
                f"imported ({type(exc).__name__}: {exc}); use 'package.module:attribute'"
            ) from None
        if not isinstance(resolved, AsyncLocalStorage):
            raise TypeError(
                f"{where} argument 'storage' names {storage!r}, which is a "
                f"{type(resolved).__name__!r}, not an AsyncLocalStorage"
            )
        return resolved
    if not isinstance(storage, AsyncLocalStorage):
        raise TypeError(
            f"{where} argument 'storage' must be an AsyncLocalStorage, a dotted path "
            f"such as 'myapp.context:request_storage', or None, not "
            f"{type(storage).__name__!r}"
        )
    return storage


def _resolve_fields(fields: Union[str, Iterable[str]], where: str) -> Tuple[str, ...]:
    # A single name is accepted as one field (convenient in YAML/JSON configs).
    if isinstance(fields, str):
        fields = (fields,)
    try:
        resolved = tuple(fields)
    except TypeError:
        raise TypeError(
            f"{where} argument 'fields' must be an iterable of str, not "
            f"{type(fields).__name__!r}; e.g. fields=('request_id',)"
        ) from None
    for field in resolved:
        if not isinstance(field, str) or not field:
            raise TypeError(
                f"{where} argument 'fields' must hold non-empty str names, not "
                f"{field!r}; e.g. fields=('request_id',)"
            )
    return resolved


def _read(store: Any, field: str) -> Any:
    # A plain dict (the middleware's store) first: isinstance() against
    # typing.Mapping runs Python frames, on every log record.
    if type(store) is dict or isinstance(store, Mapping):
        return store.get(field)
    return getattr(store, field, None)


class StoreFilter(logging.Filter):
    """A :class:`logging.Filter` that puts store fields on every record.

    :param storage: the :class:`~asl_gevent.AsyncLocalStorage` to read, or its
        dotted path (``"pkg.module:attr"`` or ``"pkg.module.attr"``, resolved
        now). Default: :data:`asl_gevent.wsgi.request_storage`.
    :param fields: names to copy; a mapping store is read with ``store.get(name)``,
        any other store with ``getattr(store, name, None)``. A single str is
        one name.
    :param placeholder: the value of a field that is missing, ``None``, or
        when there is no store (so ``%(request_id)s`` always formats).
    :param name: as for :class:`logging.Filter`.

    Attach it to a handler to tag records from every logger, or to a logger
    for that logger only. A field the record already has (``extra=``) is left
    alone. :meth:`filter` always returns ``True`` and never raises.

    :raises TypeError: bad *storage* or *fields* types.
    :raises ValueError: a *storage* path that cannot be imported, or a field
        named like a built-in :class:`~logging.LogRecord` attribute.

    .. versionadded:: 0.1
    """

    def __init__(self, storage: StorageSpec = None,
                 fields: Union[str, Iterable[str]] = ("request_id",),
                 placeholder: Any = "-", name: str = "") -> None:
        super().__init__(name)
        fields = _resolve_fields(fields, "StoreFilter()")
        clashes = [field for field in fields if field in _RECORD_ATTRIBUTES]
        if clashes:
            raise ValueError(
                f"StoreFilter() argument 'fields' names LogRecord attributes "
                f"{clashes!r}, which the filter would never set; rename them, "
                f"e.g. 'request_' + name"
            )
        self.storage = _resolve_storage(storage, "StoreFilter()")
        self.fields = fields
        self.placeholder = placeholder
        self._reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        """Set each field on *record*; always ``True`` (the record is kept)."""
        placeholder = self.placeholder
        try:
            store = self.storage.get_store()
        except Exception as exc:  # a storage subclass that misbehaves
            self._report(exc)
            store = None
        attributes = record.__dict__
        for field in self.fields:
            if field in attributes:
                continue
            value = placeholder
            if store is not None:
                try:
                    found = _read(store, field)
                except Exception as exc:
                    self._report(exc)
                else:
                    if found is not None:
                        value = found
            attributes[field] = value
        return True

    def _report(self, exc: Exception) -> None:
        # Once per filter: the report itself goes through logging, and may
        # come back through this filter (which then stays silent), and a
        # broken store would otherwise double every log line.
        if self._reported:
            return
        self._reported = True
        try:
            _log.warning("StoreFilter(%r) could not read the store; fields get %r "
                         "(reported once per filter)", self.storage, self.placeholder,
                         exc_info=(type(exc), exc, exc.__traceback__))
        except Exception:  # pragma: no cover - logging itself is broken
            pass


Processor = Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]


def store_processor(storage: StorageSpec = None,
                    fields: Union[str, Iterable[str]] = ("request_id",)) -> Processor:
    """Return a structlog processor that adds store fields to the event dict.

    :param storage: as for :class:`StoreFilter` (an
        :class:`~asl_gevent.AsyncLocalStorage`, a dotted path, or ``None`` for
        :data:`asl_gevent.wsgi.request_storage`).
    :param fields: as for :class:`StoreFilter`.

    Fields the event dict already has are kept (``setdefault``). Fields that
    are missing or ``None`` in the store, and all fields when there is no
    store, are *omitted* (structlog renders no placeholder). Errors reading
    the store are swallowed (the field is omitted) and reported once.

    :raises TypeError: bad *storage* or *fields* types.
    :raises ValueError: a *storage* path that cannot be imported.

    >>> from asl_gevent import AsyncLocalStorage
    >>> als = AsyncLocalStorage(name="doc")
    >>> add_ids = store_processor(als, fields=("request_id", "user"))
    >>> als.run({"request_id": "r1"}, add_ids, None, "info", {"event": "hi"})
    {'event': 'hi', 'request_id': 'r1'}

    .. versionadded:: 0.1
    """
    resolved = _resolve_storage(storage, "store_processor()")
    names = _resolve_fields(fields, "store_processor()")
    reported = [False]

    def add_store_fields(logger: Any, method_name: str,
                         event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        try:
            # Looked up per call: disable() replaces the storage's get_store.
            store = resolved.get_store()
            if store is None:
                return event_dict
            for field in names:
                if field not in event_dict:
                    value = _read(store, field)
                    if value is not None:
                        event_dict[field] = value
        except Exception as exc:
            if not reported[0]:
                reported[0] = True
                _log.warning("store_processor(%r) could not read the store "
                             "(reported once)", resolved,
                             exc_info=(type(exc), exc, exc.__traceback__))
        return event_dict

    return add_store_fields
