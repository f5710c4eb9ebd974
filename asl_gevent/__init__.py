"""asl_gevent: Node.js's ``AsyncLocalStorage`` for gevent and greenlet.

A store set with :meth:`AsyncLocalStorage.run` follows the request into every
greenlet, pool task, thread-pool task and link callback it starts, never leaks
into another request, and falls back to :mod:`contextvars` for asyncio.
"""

from ._detach import KNOWN_STARTERS as KNOWN_STARTERS
from ._detach import detach_starter as detach_starter
from ._detach import detached as detached
from ._detach import run_detached as run_detached
from ._detach import undetach_starter as undetach_starter
from ._hooks import install as install
from ._hooks import is_installed as is_installed
from ._hooks import uninstall as uninstall
from ._paths import SPEEDUPS as SPEEDUPS
from ._resource import AsyncResource as AsyncResource
from ._storage import AsyncLocalStorage as AsyncLocalStorage

__all__ = ["AsyncLocalStorage", "AsyncResource", "install", "uninstall", "is_installed",
           "run_detached", "detached", "detach_starter", "undetach_starter", "KNOWN_STARTERS",
           "SPEEDUPS"]

__version__ = "0.3.0.dev0"
