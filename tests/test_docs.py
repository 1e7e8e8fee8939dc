"""The README is a short guide whose pictures are a real run, and every relative link in the docs resolves."""

from __future__ import annotations

import re

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_a_guide_of_at_most_250_lines_and_2500_words():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250 and len(text.split()) <= 2500
    assert (REPO / "docs" / "results.md").is_file()


def test_the_readme_shows_a_real_models_run_not_the_tiny_demo():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (REPO / "README.md").read_text())
    assert images and all("tiny" not in i for i in images), images
    assert all((REPO / i).stat().st_size > 10_000 for i in images), images


def test_every_relative_link_resolves():
    broken = [f"{page.name}: {target}" for page in pages() for target in LINK.findall(page.read_text())
              if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists()]
    assert not broken, broken
