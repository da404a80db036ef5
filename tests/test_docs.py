"""The documentation, checked on the code: docs/checks.md is what the audit registry generates,
the README's Python examples run, every relative link resolves, and every command has a page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnctl.audit.reference import REGENERATE, checks_markdown
from bnctl.core.registry import CHECKS, FIXABLE
from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Every ```python block of ``text``: (line of its first code line, source)."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "python"]


def section_lines(text: str, heading: str) -> range:
    """The line numbers (1-based) of the ``## heading`` section of ``text``, up to the next ``## ``."""
    lines = text.splitlines()
    first = lines.index(f"## {heading}") + 1
    following = [n for n, line in enumerate(lines[first:], first + 1) if line.startswith("## ")]
    return range(first, following[0] if following else len(lines) + 1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading of a Markdown text (GitHub numbers repeated ones -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def prose(text: str) -> str:
    """``text`` without fenced and indented code blocks, where a link-like text is no link."""
    return "\n".join(line for line in FENCE.sub("", text).splitlines() if not line.startswith(("    ", "\t")))


def dead_links(page: Path, text: str) -> list[str]:
    """Every relative link of ``text`` (a page at ``page``) whose file, or heading anchor in a
    Markdown file, does not exist; web and mail links are not followed."""
    dead = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{_rel(page)}: {target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            dead.append(f"{_rel(page)}: {target} (no heading #{anchor} in {file.name})")
    return dead


# --- docs/checks.md ---------------------------------------------------------------------


def test_checks_md_is_what_the_registry_generates():
    committed = (DOCS / "checks.md").read_text(encoding="utf-8")
    assert committed == checks_markdown(), f"docs/checks.md is stale: run `{REGENERATE}` and commit it"


def test_checks_markdown_has_one_section_and_one_contents_row_per_check():
    text = checks_markdown()
    for code, check in CHECKS.items():
        assert text.count(f"\n## {code} {check.name}\n") == 1, code
        assert text.count(f"| [{code}](#{code.lower()}-{check.name}) |") == 1, code
        body = text.split(f"\n## {code} {check.name}\n")[1].split("\n## ")[0]
        for part in (check.summary, check.why, check.example, check.fix):
            assert part in body, (code, part)
        assert ("`bnctl audit --fix`.** Yes: " + FIXABLE.get(code, "") in body) == check.fixable, code
    assert not dead_links(DOCS / "checks.md", text)


def test_reference_runs_as_a_module_and_imports_no_torch():
    code = "import sys, runpy; runpy.run_module('bnctl.audit.reference', run_name='__main__'); assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == checks_markdown()


# --- Python examples --------------------------------------------------------------------

#: runs each block in a fresh namespace, compiled so that a traceback names the page and line
DRIVER = """
import sys
page, blocks = sys.argv[1], eval(sys.stdin.read())
for line, source in blocks:
    print(f"--- {page}:{line}", flush=True)
    exec(compile("\\n" * (line - 1) + source, page, "exec"), {"__name__": "__main__"})
"""


def test_readme_python_lives_in_the_library_section_only():
    text = README.read_text(encoding="utf-8")
    lines = section_lines(text, "Library use")
    blocks = python_blocks(text)
    inside = [line for line, _ in blocks if line in lines]
    assert inside, "README's Library use section has no ```python example"
    assert len(inside) == len(blocks), "every ```python block of README.md belongs in its Library use section"


def run_examples(page: Path, blocks: list[tuple[int, str]], folder: Path) -> None:
    """Run ``blocks`` of ``page`` with :data:`DRIVER` in ``folder``, which gets a link to samples/."""
    (folder / "samples").symlink_to(ROOT / "samples", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, _rel(page)], input=repr(blocks), cwd=folder, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"an example of {_rel(page)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def _slow(source: str) -> bool:
    """An ONNX export takes ~10 s: those examples run in their own test."""
    return "bnctl.export(" in source


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))], ids=_rel)
def test_python_examples_run(page, tmp_path):
    """Every ```python block of the page but the export ones runs, each on its own (a fresh
    namespace), from a folder that has samples/: a few seconds."""
    blocks = [b for b in python_blocks(page.read_text(encoding="utf-8")) if not _slow(b[1])]
    if blocks:
        run_examples(page, blocks, tmp_path)


@pytest.mark.parametrize("page", [p for p in PAGES if any(_slow(s) for _, s in python_blocks(p.read_text(encoding="utf-8")))], ids=_rel)
def test_python_export_examples_run(page, tmp_path):
    """The ```python blocks that export to ONNX, as above: ~10 s (``-k "not export_examples"``
    leaves them out)."""
    run_examples(page, [b for b in python_blocks(page.read_text(encoding="utf-8")) if _slow(b[1])], tmp_path)


def test_a_broken_example_fails_the_driver(tmp_path):
    blocks = [(3, "import bnctl\nbnctl.no_such_function(['x.pt'])\n")]
    done = subprocess.run([sys.executable, "-c", DRIVER, "README.md"], input=repr(blocks), cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode != 0
    assert 'File "README.md", line 4' in done.stderr and "has no attribute 'no_such_function'" in done.stderr


# --- links and pages --------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    assert not dead_links(page, page.read_text(encoding="utf-8"))


def test_the_link_check_finds_dead_files_and_anchors():
    text = "[a](docs/nowhere.md) [b](ARCHITECTURE.md#no-such-heading) [c](#commands) [d](https://example.com/x)\n\n    [e](indented/code.md)\n"
    assert dead_links(README, text) == ["README.md: docs/nowhere.md (no file docs/nowhere.md)", "README.md: ARCHITECTURE.md#no-such-heading (no heading #no-such-heading in ARCHITECTURE.md)"]


def test_every_command_has_a_page_and_a_readme_section():
    from bnctl.cli.app import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    text = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`bnctl ([a-z][a-z-]*)", text)) | set(re.findall(r"^\s*\$ bnctl ([a-z][a-z-]*)", text, re.M))
    assert named <= commands, f"README.md names commands bnctl does not have: {sorted(named - commands)}"
    missing = sorted(c for c in named | commands if not (DOCS / f"{c}.md").exists())
    assert not missing, f"no docs/<command>.md for: {missing}"
    assert commands <= {h[len("bnctl ") :] for h in re.findall(r"^### `(bnctl [a-z-]+)`$", text, re.M)}, "README.md needs a ### `bnctl <command>` section per command"
