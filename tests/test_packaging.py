"""The wheel and the sdist hold what they should, and the sdist's tests run.

Both are built once per session by ``python -m build --no-isolation`` (the
``build`` and ``setuptools`` of the test extras: no network, about a second)
from this checkout, into a temporary directory. The wheel must hold the package
with its ``py.typed`` marker and the licence, and no tests; the sdist must hold
everything ``pytest`` needs (tests with their helpers, conftest, scenarios and
the examples they run), so a test run from the unpacked tarball collects the
same tests as this checkout with no collection error.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path
from typing import Dict, List

import pytest

from helpers import ROOT

#: Top-level files the sdist must carry besides the package, tests and examples.
SDIST_TOP_FILES = ["LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "setup.cfg",
                   "setup.py"]


def _source_files(*folders: str) -> List[str]:
    """Every .py, .pyi and .c file (and py.typed) under *folders* of this checkout, relative."""
    found = []
    for folder in folders:
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix in (".py", ".pyi", ".c") or path.name == "py.typed":
                found.append(path.relative_to(ROOT).as_posix())
    return sorted(found)


@pytest.fixture(scope="module", name="dists")
def _dists(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Build the sdist, then the wheel from it (what ``python -m build`` does).

    From a copy of the checkout without its ``*.egg-info``: setuptools adds
    every file an old ``SOURCES.txt`` lists to a new sdist, which would hide a
    MANIFEST.in that misses something (and the build writes nothing here).
    """
    source = tmp_path_factory.mktemp("source") / "asl_gevent"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".*_cache",
        ".hypothesis", ".tox", ".nox"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True, text=True, timeout=300, cwd=str(source))
    assert proc.returncode == 0, f"build failed\n{proc.stdout}\n{proc.stderr}"
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


def _sdist_names(sdist: Path) -> List[str]:
    """Paths in the sdist relative to its top folder (``asl_gevent-X.Y.Z/``)."""
    with tarfile.open(sdist) as tar:
        names = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
    return sorted(names)


def test_pyproject_declares_setuptools_build_system() -> None:
    """pip takes the PEP 517 path (no legacy ``setup.py install`` warning);
    the metadata stays in setup.cfg."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # 3.10: the TOML parser that `build` itself depends on there
        import tomli as tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert table["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(req.replace(" ", "").startswith("setuptools>=")
               for req in table["build-system"]["requires"])
    assert "project" not in table


def test_wheel_holds_the_package_typed_and_licensed_and_no_tests(
        dists: Dict[str, Path]) -> None:
    """The wheel: every module of the package, ``py.typed``, the LICENSE, the
    gevent plugin entry point, ``Requires-Python >=3.10``; no tests, no examples."""
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        licences = [n for n in names if n.startswith(f"{dist_info}/") and
                    n.rsplit("/", 1)[-1] == "LICENSE"]
        licence_text = wheel.read(licences[0]).decode() if licences else ""

    package = sorted(n for n in names if not n.startswith(dist_info))
    # The optional accelerator: compiled when the build had a C compiler
    # (CI has one), its C source left out.
    compiled = [n for n in package if n.startswith("asl_gevent/_speedups.")
                and n.endswith((".so", ".pyd"))]
    assert package == sorted([*(n for n in _source_files("asl_gevent") if not n.endswith(".c")),
                              *compiled])
    assert "asl_gevent/_speedups.pyi" in package
    # (ASL_GEVENT_PUREPYTHON=1 at build time skips it.)
    import asl_gevent._paths

    expected = os.environ.get("CI") and asl_gevent._paths._speedups_enabled()
    assert len(compiled) == 1 or not expected, package
    assert "asl_gevent/py.typed" in package
    assert not [n for n in names if n.startswith(("tests/", "examples/", "tools/"))]
    assert "MIT License" in licence_text and "the asl_gevent authors" in licence_text
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["Name"] == "asl_gevent"
    classifiers = metadata.get_all("Classifier") or []
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Programming Language :: Python :: 3.9" not in classifiers
    assert "asl_gevent = asl_gevent._hooks:_did_patch_all" in entry_points


def test_sdist_holds_everything_the_tests_need(dists: Dict[str, Path]) -> None:
    """Every test module, helper, conftest, scenario and example of this
    checkout, the package, and the top-level files are in the sdist."""
    names = set(_sdist_names(dists["sdist"]))
    needed = [*SDIST_TOP_FILES, *_source_files("asl_gevent", "tests", "examples", "tools")]
    for name in ("tests/conftest.py", "tests/helpers.py", "tests/matrix.py",
                 "tests/gunicorn_app.py", "examples/request_logger.py"):
        assert name in needed  # the checkout itself has them: the list is not empty
    assert any(name.startswith("tests/scenarios/") for name in needed)
    assert [name for name in needed if name not in names] == []
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def _pytest_in(folder: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` with *folder* as the working directory, so that
    *folder*'s own ``asl_gevent`` (first on ``sys.path``) is the one tested."""
    env = dict(os.environ, PYTHONPATH=str(folder), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True, text=True, timeout=timeout, cwd=str(folder), env=env)


def _collected(proc: subprocess.CompletedProcess[str]) -> List[str]:
    return sorted(line for line in proc.stdout.splitlines() if "::" in line)


def test_tests_run_from_the_unpacked_sdist(dists: Dict[str, Path], tmp_path: Path) -> None:
    """Unpacked, the sdist collects exactly this checkout's tests with no
    collection error, imports its own copy of the package, and a test that
    needs the helpers and an example passes there."""
    with tarfile.open(dists["sdist"]) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+: refuse odd members outright
            tar.extraction_filter = tarfile.data_filter
        tar.extractall(tmp_path)
    (unpacked,) = tmp_path.iterdir()

    where = subprocess.run(
        [sys.executable, "-c", "import asl_gevent; print(asl_gevent.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=str(unpacked),
        env=dict(os.environ, PYTHONPATH=str(unpacked)))
    assert Path(where.stdout.strip()).parent == unpacked / "asl_gevent", where.stderr

    in_sdist = _pytest_in(unpacked, "--collect-only", "-q")
    assert in_sdist.returncode == 0, in_sdist.stdout + in_sdist.stderr
    assert "error" not in in_sdist.stdout.splitlines()[-1].lower(), in_sdist.stdout
    here = _pytest_in(ROOT, "--collect-only", "-q")
    assert here.returncode == 0, here.stdout + here.stderr
    assert _collected(in_sdist) == _collected(here)
    assert len(_collected(here)) > 100

    ran = _pytest_in(unpacked, "-q", "tests/test_exports.py",
                     "tests/test_request_logger.py::test_request_logger_demo[2]")
    assert ran.returncode == 0, ran.stdout + ran.stderr


def _module_level_imports(source: str, module: str, is_package: bool) -> List[str]:
    """Absolute names of the modules *source* imports when it is imported.

    Module level only (also inside ``if``/``try``/``else``; not in functions or
    classes, which run later if at all). An import in a ``try`` body whose
    ``except`` catches ``ImportError`` and goes on without it is optional and
    left out; the ``else`` of such a ``try`` is not optional (gunicorn 27's
    ``ggevent`` imports ``packaging`` there). ``from X import Y`` yields ``X``
    and ``X.Y`` (Y may be a submodule).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: List[str] = []

    def catches_import_error(handler: ast.ExceptHandler) -> bool:
        caught = handler.type
        names = (list(caught.elts) if isinstance(caught, ast.Tuple)
                 else [caught] if caught is not None else [])
        return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                   for n in names)

    def optional(node: ast.Try) -> bool:
        return any(catches_import_error(handler)
                   and not any(isinstance(s, ast.Raise) for s in handler.body)
                   for handler in node.handlers)

    def walk(body: List[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                found.append(target)
                found.extend(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            elif isinstance(node, ast.Try):
                if not optional(node):
                    walk(node.body)
                walk(node.orelse)
                walk(node.finalbody)
                for handler in node.handlers:  # a fallback runs only if an import failed
                    if not catches_import_error(handler):
                        walk(handler.body)
            elif isinstance(node, (ast.If, ast.With)):
                walk(node.body)
                walk(getattr(node, "orelse", []))
    walk(ast.parse(source).body)
    return found


def _gunicorn_third_party_imports(start: List[str]) -> Dict[str, List[str]]:
    """Top-level non-stdlib, non-gunicorn module -> the gunicorn modules that
    import it, following gunicorn's own imports from *start* (as installed)."""
    import importlib.util

    seen: set = set()
    todo = list(start)
    outside: Dict[str, List[str]] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # a name imported from a module, not a module
        is_package = spec.submodule_search_locations is not None
        for imported in _module_level_imports(Path(spec.origin).read_text(), name, is_package):
            top = imported.partition(".")[0]
            if top == "gunicorn":
                todo.append(imported)
            elif top and top not in sys.stdlib_module_names:
                outside.setdefault(top, []).append(name)
    return outside


def _gunicorn_extra_requirements(wheel: Path) -> List[str]:
    """Distributions ``asl_gevent[gunicorn]`` installs (base requirements and
    the ``gunicorn`` extra), read with importlib.metadata from the wheel built
    from this checkout (an editable install's metadata is as old as its last
    ``pip install``)."""
    from importlib.metadata import PathDistribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as archive:
        dist_info = next(n.split("/")[0] for n in archive.namelist()
                         if n.endswith(".dist-info/METADATA"))
        distribution = PathDistribution(zipfile.Path(archive, f"{dist_info}/"))  # type: ignore[arg-type]
        requires = distribution.requires or []
    names = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "gunicorn"}):
            names.append(canonicalize_name(requirement.name))
    return sorted(names)


def test_the_gunicorn_extra_installs_what_the_worker_classes_import(
        dists: Dict[str, Path]) -> None:
    """``pip install 'asl_gevent[gunicorn]'`` alone can load
    ``-k asl_gevent.gunicorn.GeventWorker``: every third-party module that the
    gunicorn worker modules we subclass (and gunicorn's ``base`` and
    ``gthread`` workers) import at module level belongs to gunicorn, gevent,
    greenlet or a distribution that extra requires. gunicorn 27's ``ggevent``
    imports ``packaging``, which gunicorn lists only under its own ``gevent``
    extra (whose gevent >= 24.10.1 we cannot require)."""
    from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

    from packaging.utils import canonicalize_name

    ours = (ROOT / "asl_gevent" / "gunicorn.py").read_text()
    start = [name for name in _module_level_imports(ours, "asl_gevent.gunicorn", False)
             if name.startswith("gunicorn.")]
    assert "gunicorn.workers.ggevent" in start
    start += ["gunicorn.workers.base", "gunicorn.workers.gthread"]
    imported = _gunicorn_third_party_imports(start)
    assert "gevent" in imported  # the walk reached ggevent's imports

    required = set(_gunicorn_extra_requirements(dists["wheel"]))
    assert {"gunicorn", "gevent", "greenlet"} <= required
    module_to_dists = packages_distributions()
    missing = {}
    for module, importers in sorted(imported.items()):
        owners = {canonicalize_name(d) for d in module_to_dists.get(module, [])}
        if not owners:
            # Python 3.10's packages_distributions() reads only top_level.txt,
            # which flit-built wheels (packaging's) do not have: fall back to
            # a distribution named like the module.
            try:
                owners = {canonicalize_name(distribution(module).metadata["Name"])}
            except PackageNotFoundError:
                pass
        assert owners, f"{module} (imported by {importers}) is not installed here"
        if not owners & required:
            missing[module] = (sorted(owners), sorted(set(importers)))
    assert missing == {}, f"the gunicorn extra misses these: {missing}"


def test_the_version_is_the_changelogs_newest_release(dists: Dict[str, Path]) -> None:
    """``__version__`` (and so the wheel's) is a pre-release of the newest
    CHANGELOG section, the one whose pages say ``versionadded:: 0.3``."""
    import re

    from packaging.version import Version

    import asl_gevent

    newest = re.search(r"^## (\d+\.\d+\.\d+) ", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest is not None
    assert asl_gevent.__version__ == f"{newest.group(1)}.dev0" == "0.3.0.dev0"
    assert Version(asl_gevent.__version__).base_version == newest.group(1)
    # A wheel for this CPython and platform when the accelerator was compiled.
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert re.fullmatch(rf"asl_gevent-{re.escape(asl_gevent.__version__)}-"
                        rf"(py3-none-any|{tag}-{tag}-[a-z0-9_]+)\.whl", dists["wheel"].name)
