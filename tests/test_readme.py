"""README.md: valid Markdown, short, with working links and runnable examples.

The README is the front door (the docs site under ``docs/`` is the house):
it must render as written (no fence left open that swallows the headings
after it), stay within 300 lines, link only to files that exist, keep the two
Quick start commands exactly, and every ``>>>`` block in it must run *alone*,
as a reader pastes it.
"""

from __future__ import annotations

import doctest
import re
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest
from markdown_it import MarkdownIt

from helpers import ROOT

README = ROOT / "README.md"
DEMO = ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
        ".venv/bin/python examples/request_logger.py")
TESTS = ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
         ".venv/bin/python -m pytest")
DOCS_BUILD = (".venv/bin/pip install -e '.[docs]' && "
              ".venv/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html")


def markdown_problems(text: str) -> List[str]:
    """What would make *text* render other than as its author meant.

    markdown-it-py (CommonMark) is the judge. A fence that is never closed
    runs to the end of the file; a line such as ````` ``` Neither...````` is
    not a closing fence (a closing fence takes no info string), so the block
    goes on and swallows the headings and commands after it. Both show as
    (1) a fence token that runs to the last line without a closing fence, or
    (2) a heading a naive reader sees (a ``#`` line outside what *looks* like
    a code block) that the parser does not make a heading.
    """
    problems = []
    lines = text.splitlines()
    tokens = MarkdownIt("commonmark").parse(text)
    for token in tokens:
        if token.type == "fence" and token.map is not None:
            last = lines[token.map[1] - 1].strip() if token.map[1] <= len(lines) else ""
            if token.map[1] - token.map[0] < 2 or not re.fullmatch(r"(`{3,}|~{3,})", last):
                problems.append(f"line {token.map[0] + 1}: code fence never closed")
    parsed = [lines[t.map[0]].strip() for t in tokens
              if t.type == "heading_open" and t.map is not None]
    naive, in_code = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            naive.append(line.strip())
    for heading in naive:
        if heading not in parsed:
            problems.append(f"heading {heading!r} is not rendered as a heading "
                            "(swallowed by a code block?)")
    return problems


def test_the_readme_renders_as_written() -> None:
    assert markdown_problems(README.read_text()) == []


BROKEN = """# Title

```python
handler.addFilter(StoreFilter())
``` Neither the filter nor the processor
ever raises.

### gunicorn

```sh
gunicorn -k asl_gevent.gunicorn.GeventWorker myapp:app
```
"""


def test_the_check_catches_a_broken_fence_and_a_swallowed_heading() -> None:
    """The 0.2 README's defect, in small: the check must see it."""
    problems = markdown_problems(BROKEN)
    assert "heading '### gunicorn' is not rendered as a heading (swallowed by a code block?)" \
        in problems
    assert markdown_problems("# T\n\n```\ncode\n") == ["line 3: code fence never closed"]


def test_the_0_2_readme_fails_the_check() -> None:
    """Negative control against the real thing, when git history is at hand."""
    proc = subprocess.run(["git", "show", "d382dac:README.md"], cwd=str(ROOT),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("no git history here (an sdist)")
    assert any("### gunicorn" in p for p in markdown_problems(proc.stdout))


def test_the_readme_fits_on_a_few_screens() -> None:
    assert len(README.read_text().splitlines()) <= 300


def _fences() -> List[Tuple[str, str]]:
    tokens = MarkdownIt("commonmark").parse(README.read_text())
    return [(t.info.strip(), t.content) for t in tokens if t.type == "fence"]


def test_the_quick_start_commands_come_first_and_are_exact() -> None:
    """The two set-up commands (run the demo; run the tests) open the README,
    exactly as CI and the docs quote them."""
    bash = [content.strip() for info, content in _fences() if info == "bash"]
    assert bash[:2] == [DEMO, TESTS]


def test_one_command_builds_the_docs() -> None:
    bash = [content.strip() for info, content in _fences() if info == "bash"]
    assert DOCS_BUILD in bash
    assert DOCS_BUILD in (ROOT / "docs" / "versions.rst").read_text()


def _doctest_blocks() -> List[str]:
    return [content for info, content in _fences() if ">>>" in content]


def test_the_readme_has_examples() -> None:
    assert len(_doctest_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(_doctest_blocks())))
def test_each_readme_example_runs_alone(index: int) -> None:
    """Pasted alone into a fresh interpreter, each block gives the output shown
    (no block leans on names another block defined)."""
    source = _doctest_blocks()[index]
    test = doctest.DocTestParser().get_doctest(source, {}, f"README block {index}",
                                               str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_the_recipe_is_the_tested_example() -> None:
    """The README's copy-paste recipe is, line for line, the app part of
    examples/gunicorn_recipe.py, which tests/test_examples.py runs."""
    source = (ROOT / "examples" / "gunicorn_recipe.py").read_text()
    app = source.split("# -- the app (what you copy)")[1].split("# -- the script")[0]
    app = app.split("\n", 1)[1].strip("\n")
    python = [content.strip("\n") for info, content in _fences() if info == "python"]
    assert app in python


def test_relative_links_point_to_files_that_exist() -> None:
    tokens = MarkdownIt("commonmark").parse(README.read_text())
    links = [child.attrs["href"] for token in tokens if token.children
             for child in token.children if child.type == "link_open"]
    local = [str(href) for href in links if not re.match(r"[a-z]+:|#", str(href))]
    assert len(local) >= 10
    assert [href for href in local if not (ROOT / href.split("#")[0]).is_file()] == []
    assert any(href.startswith("docs/") and href.endswith(".rst") for href in local)


def test_facts_tests_rely_on_are_in_the_docs() -> None:
    """Sentences other tests and users look for moved to the docs, not away."""
    docs = "\n".join(p.read_text() for p in Path(ROOT / "docs").rglob("*.rst"))
    for fact in ["asl_gevent.leak", "ASL_GEVENT_AUTO_INSTALL=0", "ASL_GEVENT_LEAK_WATCH=5",
                 "ASL_GEVENT_DETACH_KNOWN=0", "%({asl_gevent.request_id}e)s",
                 "GeventPyWSGIWorker", "TCP_NODELAY", "writes to **stderr**",
                 "post_worker_init", "--preload"]:
        assert fact in docs, fact


def _setup_cfg_extras() -> dict:
    """``extra -> [project name, ...]`` from setup.cfg's extras_require."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {extra: [re.match(r"[A-Za-z0-9_.-]+", line.strip()).group(0)  # type: ignore[union-attr]
                    for line in lines.splitlines() if line.strip()]
            for extra, lines in cfg["options.extras_require"].items()}


def _readme_extras() -> dict:
    """``extra -> installs cell`` of the README's extras table."""
    return {m[1]: m[2] for m in re.finditer(r"^\| `([\w-]+)` \| ([^|]*) \|",
                                            README.read_text(), re.M)}


def _install_page_extras() -> dict:
    """``extra -> installs cell`` of the extras list-table in docs/howto/install.rst."""
    text = (ROOT / "docs" / "howto" / "install.rst").read_text()
    return {m[1]: m[2] for m in re.finditer(r"^   \* - ``([\w-]+)``\n     - (.*)\n", text, re.M)}


@pytest.mark.parametrize("where", ["README.md", "docs/howto/install.rst"])
def test_the_extras_tables_list_every_extra_of_setup_cfg(where: str) -> None:
    """Both extras tables name exactly setup.cfg's extras, and what each
    installs (every project it lists; ``test``'s is a summary)."""
    extras = _setup_cfg_extras()
    assert {"gunicorn", "http", "celery", "django", "docs", "test"} <= set(extras)
    table = _readme_extras() if where == "README.md" else _install_page_extras()
    assert sorted(table) == sorted(extras)
    missing = {extra: [name for name in names if name.lower() not in table[extra].lower()]
               for extra, names in extras.items() if extra != "test"}
    assert {extra: names for extra, names in missing.items() if names} == {}
