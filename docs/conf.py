"""Sphinx configuration for the asl_gevent documentation.

Build it from the checkout (CI does the same, with warnings as errors):

    .venv/bin/pip install -e '.[docs]'
    .venv/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html
    .venv/bin/sphinx-build -W --keep-going -n -b doctest docs docs/_build/doctest

Choices, and why:

- Theme: furo. It is what structlog (one of the libraries our users read) uses,
  it renders code and long tables readably on a phone, and it needs no
  JavaScript build or network at build time.
- Extensions, all shipped with Sphinx itself except myst-parser:
  ``sphinx.ext.autodoc`` (the API reference is generated from the docstrings,
  as gevent, greenlet and structlog do), ``sphinx.ext.doctest`` (every ``>>>``
  example in the docs runs: ``-b doctest``; each page is one session),
  ``sphinx.ext.graphviz`` (the propagation diagram is drawn from its DOT source
  at build time, not pasted as an image; needs Graphviz's ``dot``, Debian
  package ``graphviz``), ``sphinx.ext.viewcode`` (source links from the API
  reference), and ``myst_parser`` (to include CHANGELOG.md as written).
- No intersphinx: the build machine reaches no network but package registries,
  so inventories of the Python, gevent or Celery docs cannot be fetched. Names
  from those projects are therefore listed in ``nitpick_ignore_regex`` below
  (by package prefix, never a name of ours), and everything of ours must
  resolve: the build runs with ``-n`` (nitpicky) and ``-W``.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the checkout's asl_gevent and examples/, installed or not

import asl_gevent  # noqa: E402

project = "asl_gevent"
author = "the asl_gevent authors"
copyright = "the asl_gevent authors, MIT licence"
release = asl_gevent.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.graphviz",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# CHANGELOG.md is included by changelog.rst, never built as a page of its own.
suppress_warnings = ["myst.header"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"asl_gevent {release}"
html_static_path: list[str] = []

# -- autodoc ------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}
# gunicorn and celery are optional extras; when they are not installed the
# reference still builds (their pages then show the module docstring only).
autodoc_mock_imports: list[str] = []
for optional in ("gunicorn", "celery"):
    try:
        __import__(optional)
    except ImportError:
        autodoc_mock_imports.append(optional)

# -- graphviz -----------------------------------------------------------------
graphviz_output_format = "svg"

# -- doctest ------------------------------------------------------------------
# Each page's examples are one session (sphinx.ext.doctest's default group is
# per document); nothing is set up behind the reader's back.
doctest_global_setup = ""
doctest_default_flags = (__import__("doctest").ELLIPSIS
                         | __import__("doctest").NORMALIZE_WHITESPACE
                         | __import__("doctest").DONT_ACCEPT_TRUE_FOR_1)

# -- nitpicky cross-references ----------------------------------------------
nitpicky = True
# Names from other projects' docs (no intersphinx here, see above): the
# standard library, gevent, greenlet, gunicorn, celery, typing helpers.
_EXTERNAL = (
    r"(contextvars|typing|collections|concurrent|threading|asyncio|logging|types|"
    r"weakref|signal|json|http|urllib|socket|io|os|sys|re|enum|abc|functools|"
    r"gevent|greenlet|gunicorn|celery|kombu|requests|urllib3|httpx|structlog|"
    r"opentelemetry|sentry_sdk|flask|django|werkzeug)(\..*)?"
)
_BUILTINS = (
    r"(object|str|bytes|int|float|bool|dict|list|tuple|set|frozenset|type|None|"
    r"callable|Callable|Any|Optional|Union|Iterable|Iterator|Mapping|Sequence|"
    r"Collection|Generator|Awaitable|Coroutine|TypeVar|Generic|T|R|F|"
    r"BaseException|Exception|TypeError|ValueError|RuntimeError|LookupError|"
    r"AttributeError|KeyError|RuntimeWarning|NotImplemented|"
    r"Context|ContextVar|Token|Greenlet|greenlet|Logger|LogRecord|Filter|Handler|"
    r"StartResponse|WSGIApplication|WSGIEnvironment|Environ|Headers|"
    r"TracebackType|FrameType|CoroutineType|Thread|Future|Signals|Handlers|"
    r"FrameType|ModuleType|NoneType|ellipsis|EllipsisType)"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL),
    (r"py:.*", _BUILTINS),
    # Type variables and private type aliases in our signatures (shown as
    # text): T/R are a store's and a function's result type.
    (r"py:.*", r"asl_gevent\.(\w+\.)?(T|R|F|WSGIApp|StorageSpec|Processor|_Scope|StartResponse|Headers)"),
    (r"py:.*", r"(WSGIApp|StorageSpec|Processor|StartResponse)"),
    # Private modules named in docstrings; the Concepts page describes them.
    (r"py:mod", r"asl_gevent\._\w+"),
    # Type aliases of private modules in signatures (``_ids.Trust``).
    (r"py:.*", r"(asl_gevent\.)?_\w+\.[A-Z]\w*"),
]
