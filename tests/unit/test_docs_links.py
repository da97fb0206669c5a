"""The README and the docs link to files and sections that exist, and the README keeps its place as the front door."""
from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

PAGES = ["README.md", "docs/concepts.md", "docs/security-model.md", "docs/operations.md",
         "docs/guides/platform-admin.md", "docs/guides/requester.md", "docs/guides/approver.md",
         "docs/reference/api.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_reaches_a_file_and_section(page):
    path = REPO / page
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", path.read_text(), flags=re.S))
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(linked.read_text()), f"{page} links to {target}: no such section"


def test_the_readme_is_short_and_leads_to_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    assert "## The two commands" in readme and "make dev" in readme and "make test" in readme
    assert "make e2e" in readme and "make bench" in readme
    for page in [*PAGES[1:], "docs/guides/matching-builds.md", "docs/reference/kubectl-keyroom.md",
                 "charts/keyroom/README.md", "charts/keyroom/docs/gitops.md"]:
        assert f"]({page})" in readme, f"the README does not link {page}"
