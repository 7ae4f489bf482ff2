"""README.md is a landing page and docs/ a MkDocs site; both are kept honest here.

The site builds with `mkdocs build --strict` (mkdocs.yml turns every broken link, anchor and page left out of the
navigation into a warning, which strict makes an error); README.md stays short, every relative link in it points at
a file (and a heading, when it names one) that exists, and no page mentions the work items of the project's tracker.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300
INSTALL_HINT = 'pip install -e ".[dev]" (the dev extra has mkdocs)'

# "issue 6", "item 4", "issues 3 and 4", "Item #11", "ticket 2": the tracker's numbering means nothing to a reader
WORK_ITEM = re.compile(r"\b(?:issue|item|ticket)s?\s*#?\d+", re.IGNORECASE)
# inline links and images, [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"(`+).*?\1", "", _fenced_removed(text), flags=re.S)


def _relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(_prose(text)) if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:|#|//", t)]


def _anchors(markdown_file: Path) -> set[str]:
    """The ids MkDocs (Python-Markdown's toc extension) gives the file's headings."""
    from markdown.extensions.toc import slugify, unique

    ids: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _fenced_removed(markdown_file.read_text()), re.M):
        plain = html.unescape(re.sub(r"[`*_]|<[^>]+>", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)))
        unique(slugify(plain, "-"), ids)  # adds the id, with _1, _2 ... for repeated headings, as MkDocs does
    return ids


def _fenced_removed(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def _doc_files() -> list[Path]:
    return [README, ROOT / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]


# ---- the site builds ----------------------------------------------------------------------------------------------


def test_mkdocs_builds_the_site_strictly(tmp_path):
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail(f"mkdocs is not installed: {INSTALL_HINT}", pytrace=False)
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    # strict only means something if the validation it enforces is switched on: links, anchors, the nav
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert config["validation"]["links"] == {"not_found": "warn", "absolute_links": "warn",
                                             "unrecognized_links": "warn", "anchors": "warn"}, config["validation"]
    assert config["validation"]["nav"]["omitted_files"] == "warn" and config["validation"]["nav"]["not_found"] == "warn"
    # every page in the navigation became a page of the site
    pages = [next(iter(entry.values())) for entry in config["nav"]]
    assert {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} == set(pages)
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), (page, sorted(str(p.relative_to(site)) for p in site.rglob("*.html")))


# ---- README.md is a landing page ----------------------------------------------------------------------------------


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: "
                                            "move the detail into a page of docs/")


def test_readme_relative_links_point_at_files_and_headings_that_exist():
    links = _relative_links(README.read_text())
    assert any(link.startswith("docs/") for link in links), links  # it does link into the docs
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / path).resolve() if path else README
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with the id {anchor!r} in {target.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_no_page_mentions_work_items():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _doc_files() for number, line in enumerate(path.read_text().splitlines(), 1)
             if WORK_ITEM.search(line)]
    assert not found, "work-item references mean nothing to readers; say what the change does instead:\n" + \
        "\n".join(found)


def test_the_checks_catch_what_they_look_for():
    """The patterns themselves: a link checker that finds no links, or an item pattern that matches nothing,
    would pass everything."""
    text = "See [a](docs/a.md#b), ![p](docs/p.jpg), [w](https://x.org/y), [s](#top), `[c](code.md)`.\n"
    assert _relative_links(text) == ["docs/a.md#b", "docs/p.jpg"]
    for bad in ("as issue 6 said", "Item 4", "items 3 and 4", "issue #11's figure", "ticket 2"):
        assert WORK_ITEM.search(bad), bad
    for fine in ("an issue with 6 images", "each item", "200 items", "the issues"):
        assert not WORK_ITEM.search(fine), fine


def _ircnn_commands(text: str) -> list[str]:
    """The `ircnn ...` command lines of the fenced code blocks (backslash continuations joined, comments cut),
    less synopses that show optional parts in brackets."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\$\s+", "", line.strip())
            if line.startswith("ircnn ") and "[" not in line.split("#")[0]:
                commands.append(line)
    return commands


def test_every_command_in_readme_and_docs_parses():
    """Each `ircnn` line a user copies from README or the docs is accepted by the CLI's parser (a renamed or
    removed flag fails here, not on a user's machine); nothing is run."""
    import shlex

    from service.cli import build_parser

    parser = build_parser()
    checked, wrong = 0, []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for line in _ircnn_commands(page.read_text()):
            argv = shlex.split(line, comments=True)
            argv = argv[1:argv.index("|")] if "|" in argv else argv[1:]
            try:
                parser.parse_args(argv)
                checked += 1
            except SystemExit:
                wrong.append(f"{page.name}: {line}")
    assert wrong == [] and checked >= 20, wrong
