"""Metadata lives in setup.cfg; this file adds the optional C accelerator.

``asl_gevent._speedups`` (the spawn + join hooks and ``get_store`` in C) is built when a C
compiler is there, and skipped with a warning when it is not or when the
build fails, as markupsafe and msgpack do: ``asl_gevent`` then runs its
pure-Python hooks, which behave the same (``asl_gevent.SPEEDUPS`` says
which one runs). ``ASL_GEVENT_PUREPYTHON=1`` at build time skips it too.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class optional_build_ext(build_ext):
    """``build_ext`` that warns instead of failing: the extension is optional."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler (setuptools' CCompilerError, DistutilsPlatformError...)
            _warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # a compiler that fails (missing Python.h, old headers...)
            _warn(exc)


def _warn(exc: BaseException) -> None:
    sys.stderr.write(
        "WARNING: asl_gevent's optional C accelerator could not be built "
        f"({type(exc).__name__}: {exc}); asl_gevent runs in pure Python instead "
        "(same behaviour; spawn + join and get_store cost more, up to 1.7x for "
        "get_store on CPython 3.11: see docs/performance.rst).\n")


def _extensions() -> list:
    # CPython only (the C API it uses); PyPy and a forced pure build skip it.
    if platform.python_implementation() != "CPython":
        return []
    if os.environ.get("ASL_GEVENT_PUREPYTHON", "").strip().lower() not in (
            "", "0", "false", "no", "off"):
        return []
    return [Extension("asl_gevent._speedups", ["asl_gevent/_speedups.c"], optional=True)]


setup(ext_modules=_extensions(), cmdclass={"build_ext": optional_build_ext})
