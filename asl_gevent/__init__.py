"""asl_gevent: Node.js's ``AsyncLocalStorage`` for gevent and greenlet.

A store set with :meth:`AsyncLocalStorage.run` follows the request into every
greenlet, pool task, thread-pool task and link callback it starts, never leaks
into another request, and falls back to :mod:`contextvars` for asyncio.
"""

from ._hooks import install as install
from ._hooks import is_installed as is_installed
from ._hooks import uninstall as uninstall
from ._resource import AsyncResource as AsyncResource
from ._storage import AsyncLocalStorage as AsyncLocalStorage

__all__ = ["AsyncLocalStorage", "AsyncResource", "install", "uninstall", "is_installed"]

__version__ = "0.1.0"
