"""Run info with stores: which request is this stuck greenlet serving?

:func:`format_run_info` is gevent's :func:`gevent.util.format_run_info` (every
thread's stack, then every live greenlet in every thread's hub, as a spawn
tree) with one more entry per greenlet: the stores its context holds, each as
the storage's name and a short, truncated ``repr`` -- never a full dump of a
store. A greenlet serving a request watched by the leak watch also shows that
the request has ended.

>>> import gevent
>>> from asl_gevent import AsyncLocalStorage
>>> from asl_gevent.debug import format_run_info
>>> als = AsyncLocalStorage(name="request")
>>> stuck = als.run({"request_id": "r-stuck"}, gevent.spawn, gevent.sleep, 30)
>>> gevent.sleep(0)
>>> lines = format_run_info(thread_stacks=False)
>>> [line.strip(" :|") for line in lines if "Stores:" in line and "r-stuck" in line]
["Stores: request={'request_id': 'r-stuck'}"]
>>> stuck.kill()

A greenlet *running* in another OS thread at that moment -- without
monkey-patching, typically a gevent ``ThreadPool`` task blocked in
``time.sleep`` or a socket read -- shows no stores: greenlet does not let one
thread read the context of a greenlet running in another (``ValueError``,
greenlet 3.x). Its stack is still listed under the threads. Under
monkey-patching such a task waits in its thread's hub, not running, and its
stores are shown.

:func:`install_signal_handler` prints it to ``stderr`` when the process gets
a signal, like ``faulthandler`` but for greenlets. It is opt-in: nothing is
installed by import. The default signal is one no common server uses
(:data:`DEFAULT_SIGNAL`: ``SIGPWR`` on Linux, ``kill -PWR <pid>``;
``SIGINFO`` on macOS and the BSDs, Ctrl-T in a terminal). A signal that
already has a Python handler is shared: the run info is printed, then the
replaced handler runs, so gunicorn's ``SIGUSR1`` still reopens its log
files. A signal some C code handles (uWSGI's ``SIGUSR1``/``SIGUSR2`` stats,
``faulthandler.register``) cannot be shared and is refused.

Signals the servers own (for the worker processes, where the handler is
installed; the masters use more):

* gunicorn workers: ``SIGTERM`` (graceful stop), ``SIGINT``/``SIGQUIT`` (quick
  stop), ``SIGABRT`` (timeout), ``SIGUSR1`` (reopen logs, logrotate's
  postrotate), ``SIGWINCH``; the master also ``SIGHUP``, ``SIGTTIN``,
  ``SIGTTOU``, ``SIGUSR2``, ``SIGCHLD``.
* uWSGI workers (C handlers, seen in uWSGI 2.0.30 ``--gevent``): ``SIGHUP``
  (graceful reload), ``SIGTERM`` and ``SIGINT`` (stop; ``SIGTERM`` sent to
  the master *reloads* it), ``SIGUSR1`` (statistics), ``SIGUSR2`` (what each
  core is doing), ``SIGWINCH``, ``SIGTSTP``, and ``SIGPIPE`` ignored; the
  master also ``SIGQUIT`` (stop), ``SIGURG``, ``SIGCHLD``.

.. versionadded:: 0.2
.. versionchanged:: 0.3 the default signal is :data:`DEFAULT_SIGNAL`, no longer
   ``SIGUSR1`` (gunicorn's "reopen log files"); the replaced handler is
   chained; a signal handled outside Python is refused.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Dict, List, Optional, TextIO

from gevent import util as _gevent_util
from greenlet import greenlet

from . import __version__, _paths
from ._watch import format_stores, request_marker, stores_in

__all__ = ["format_run_info", "print_run_info", "install_signal_handler",
           "uninstall_signal_handler", "stores_of", "DEFAULT_SIGNAL"]


def stores_of(glet: greenlet) -> str:
    """``name=repr, ...`` of the stores *glet*'s context holds ('' for none).

    :param glet: any greenlet (a :class:`gevent.Greenlet`, a raw greenlet, a hub).
    :raises TypeError: if *glet* is not a greenlet.

    .. versionadded:: 0.2
    """
    if not isinstance(glet, greenlet):
        raise TypeError(f"stores_of() argument 'glet' must be a greenlet, not "
                        f"{type(glet).__name__!r}; e.g. stores_of(gevent.getcurrent())")
    try:
        context = glet.gr_context
    except (ValueError, AttributeError):  # the running greenlet of another thread
        return ""
    if context is None:
        return ""
    text = format_stores([(name, store) for name, store in stores_in(context)
                          if store is not None])
    marker = context.get(request_marker)
    if text and marker is not None and marker.ended:
        text += "  (its request has ended)"
    return text


class _StoreTree(_gevent_util.GreenletTree):  # type: ignore[misc]  # gevent is untyped
    """gevent's greenlet tree, with a ``Stores:`` entry per greenlet."""

    # gevent (>= 1.3, checked on 26.9) renders a greenlet's gevent.local
    # values in this name-mangled method, right before its children; that is
    # where the stores belong too.
    def _GreenletTree__render_locals(self, tree: Any) -> None:  # noqa: N802
        super()._GreenletTree__render_locals(tree)
        text = stores_of(self.greenlet)
        if text:
            tree.child_data("Stores: " + text)

    def _render(self, tree: Any) -> Any:
        # gevent 24.2's Hub.__repr__ reads an attribute Hub.destroy() deletes,
        # so a destroyed hub that something still references (another
        # thread's, say) breaks gevent's own rendering of it and of its
        # children: show such a node by type and address, and nothing else.
        try:
            repr(self.greenlet)
            repr(getattr(self.greenlet, "parent", None))
        except Exception:  # noqa: BLE001 - whatever a broken __repr__ raises
            tree.node_label(f"<{type(self.greenlet).__name__} at 0x{id(self.greenlet):x}; "
                            "cannot be shown (destroyed)>")
            return tree.lines
        return super()._render(tree)


def format_run_info(thread_stacks: bool = True, greenlet_stacks: bool = True,
                    limit: Optional[int] = None) -> List[str]:
    """gevent's run info (threads, then the greenlet trees) with each greenlet's stores.

    The parameters are those of :func:`gevent.util.format_run_info`.

    :param thread_stacks: include every OS thread's stack.
    :param greenlet_stacks: include the stacks of the current thread's greenlets.
    :param limit: the most frames to show per stack (``None``: all).
    :returns: the lines, without line ends. Never raises: a store whose
        ``repr`` fails is shown as such.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 the greenlets' header names asl_gevent's version
       and whether its hooks and ``get_store`` run compiled
       (:data:`asl_gevent.SPEEDUPS`).
    """
    from gevent import monkey

    lines: List[str] = []
    current = monkey.get_original("_thread", "get_ident")()
    _gevent_util._format_thread_info(lines, thread_stacks, limit, current)
    lines.append("*" * 80)
    lines.append("* Greenlets, with the stores of asl_gevent")
    lines.append(f"* asl_gevent {__version__}, spawn + join hooks and get_store "
                 f"{'compiled' if _paths.SPEEDUPS else 'in pure Python'} (asl_gevent.SPEEDUPS)")
    lines.append("*" * 80)
    def order(tree: Any) -> str:
        if tree.is_current_tree:
            return ""
        try:
            return repr(tree.greenlet)
        except Exception:  # noqa: BLE001 - a destroyed hub: see _StoreTree._render
            return f"~{id(tree.greenlet)}"

    for tree in sorted(_StoreTree.forest(), key=order):
        lines.append("---- Thread boundary")
        lines.extend(tree.format_lines(details={
            # As gevent does: another thread's greenlets would show our stack.
            "running_stacks": greenlet_stacks if tree.is_current_tree else False,
            "running_stack_limit": limit,
        }))
    return lines


def print_run_info(thread_stacks: bool = True, greenlet_stacks: bool = True,
                   limit: Optional[int] = None, file: Optional[TextIO] = None) -> None:
    """Print :func:`format_run_info` to *file* (``sys.stderr`` by default).

    It writes to **stderr**, not stdout, unless *file* is given (as the signal
    handler of :func:`install_signal_handler` does too).

    :param thread_stacks: as :func:`format_run_info`.
    :param greenlet_stacks: as :func:`format_run_info`.
    :param limit: as :func:`format_run_info`.
    :param file: a text stream to write to; ``None`` means ``sys.stderr``.

    .. versionadded:: 0.2
    """
    out = file if file is not None else sys.stderr
    for line in format_run_info(thread_stacks, greenlet_stacks, limit):
        print(line, file=out)
    out.flush()


#: The signal :func:`install_signal_handler` uses unless told otherwise: one
#: that neither gunicorn nor uWSGI (nor gevent) uses. ``SIGPWR`` on Linux
#: (sent by nothing else but power-failure daemons to init, and by
#: ``lxc-stop`` to a container's init, which a worker is not), ``SIGINFO``
#: on macOS and the BSDs (the terminal's "status" key, Ctrl-T), else ``SIGUSR1``.
#:
#: .. versionadded:: 0.3
DEFAULT_SIGNAL: int = int(getattr(signal, "SIGPWR", 0) or getattr(signal, "SIGINFO", 0)
                          or signal.SIGUSR1)

#: signum -> the handler :func:`install_signal_handler` replaced (and chains to).
_previous: Dict[int, Any] = {}


def _check_signum(signum: Any, where: str) -> None:
    if not isinstance(signum, int) or isinstance(signum, bool):
        raise TypeError(f"{where} argument 'signum' must be a signal number, not "
                        f"{type(signum).__name__!r}; e.g. asl_gevent.debug.DEFAULT_SIGNAL "
                        f"(the default; SIGUSR1 belongs to gunicorn and uWSGI)")


def _on_signal(signum: int, frame: Any) -> None:
    try:
        print_run_info()
    except Exception as exc:  # noqa: BLE001 - never raise into whatever was interrupted
        try:
            print(f"asl_gevent: run info failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - stderr closed
            pass
    finally:
        previous = _previous.get(signum)
        # SIG_DFL would end the process (the default action of most signals)
        # and SIG_IGN is nothing: only a handler written in Python is chained.
        if callable(previous):
            previous(signum, frame)


def _os_handler(signum: int) -> Optional[int]:
    """The address of the handler the OS has for *signum* (0 default, 1 ignore),
    or ``None`` where it cannot be read.

    Python's :func:`signal.getsignal` reports what Python installed and, for
    the rest, what the OS had when the interpreter started: a handler C code
    installed later (uWSGI's, ``faulthandler.register``'s) shows as
    ``SIG_DFL``. ``sigaction(2)`` with no new action reads the real one; the
    handler is the first member of ``struct sigaction`` on Linux and macOS.
    """
    if not sys.platform.startswith(("linux", "darwin", "freebsd")):  # pragma: no cover
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        old = ctypes.create_string_buffer(512)  # larger than any struct sigaction
        if libc.sigaction(ctypes.c_int(signum), None, old) != 0:
            return None
        return ctypes.c_void_p.from_buffer(old).value or 0
    except Exception:  # noqa: BLE001 - no libc, no sigaction: cannot tell  # pragma: no cover
        return None


def install_signal_handler(signum: int = DEFAULT_SIGNAL) -> None:
    """Print the run info with stores to ``stderr`` whenever *signum* arrives.

    Call it from the main thread (a rule of :func:`signal.signal`), in the
    process to be inspected: in a server's worker (gunicorn: the app module or
    a ``post_fork`` hook; uWSGI: a ``@postfork`` function, or the app module,
    which without ``--lazy-apps`` runs in the master and hands the handler of
    the default signal down to every worker it forks). The replaced Python handler is kept
    for :func:`uninstall_signal_handler` and runs after each dump, so a
    signal the server uses keeps working: with ``signal.SIGUSR1`` under
    gunicorn, logrotate's ``kill -USR1`` still reopens the log files (and
    also dumps the run info each time). Idempotent.

    :param signum: the signal; by default :data:`DEFAULT_SIGNAL`, which no
        common server uses (``SIGPWR`` on Linux: ``kill -PWR <pid>``).
    :raises TypeError: if *signum* is not an int (a bool is not a signal
        number: ``True`` would be ``SIGHUP``).
    :raises ValueError: if the system has no such signal (from
        :func:`signal.signal`), or if C code handles *signum* (uWSGI does
        ``SIGUSR1`` and ``SIGUSR2`` in its workers; ``faulthandler.register``
        too): such a handler cannot be called from Python, and replacing it
        would silently take the signal from its owner. Nothing is changed.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 the default signal is :data:`DEFAULT_SIGNAL`
       (was ``SIGUSR1``, gunicorn's "reopen log files"); the replaced handler
       runs after the dump; a signal handled by C code raises ``ValueError``.
    """
    _check_signum(signum, "install_signal_handler()")
    current = signal.getsignal(signum)
    if current is _on_signal:
        return
    if current is None or current in (signal.SIG_DFL, signal.SIG_IGN):
        address = _os_handler(signum)
        expected = 1 if current is signal.SIG_IGN else 0
        if current is None or (address is not None and address != expected):
            try:
                name = signal.Signals(signum).name
            except ValueError:  # pragma: no cover - a real-time signal, say
                name = f"signal {signum}"
            raise ValueError(
                f"install_signal_handler() argument 'signum': {name} already has a handler "
                "installed outside Python (uWSGI's workers use SIGUSR1 and SIGUSR2; "
                "faulthandler.register too), which cannot be chained; use a free signal, "
                f"e.g. the default, signal.{signal.Signals(DEFAULT_SIGNAL).name}")
    signal.signal(signum, _on_signal)
    _previous[signum] = current


def uninstall_signal_handler(signum: int = DEFAULT_SIGNAL) -> None:
    """Put back the handler :func:`install_signal_handler` replaced. Idempotent.

    :param signum: as for :func:`install_signal_handler`.
    :raises TypeError: as :func:`install_signal_handler`.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 the default signal is :data:`DEFAULT_SIGNAL`.
    """
    _check_signum(signum, "uninstall_signal_handler()")
    if signum in _previous and signal.getsignal(signum) is _on_signal:
        signal.signal(signum, _previous.pop(signum))
