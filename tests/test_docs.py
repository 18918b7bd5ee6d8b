"""The documentation tells the truth about the code: the settings page is what the code generates,
every link and #anchor between README.md and docs/ resolves, no page carries a hand-copied
settings table, and the README's first two commands are the ones CI and `make serve` run."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from server import settings_reference
from testing.live_server import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, inline code and links as their text, punctuation
    but hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
            seen[base] = n + 1
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


def test_configuration_page_is_generated_from_the_settings():
    assert (ROOT / "docs" / "configuration.md").read_text() == settings_reference.render(), (
        "docs/configuration.md is out of date: run python -m server.settings_reference"
    )
    for name in settings_reference.Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in settings_reference.render()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {resolved.name}")
    assert not broken, f"{page.name}:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "configuration.md"], ids=lambda p: p.name)
def test_no_hand_copied_settings_table(page):
    """Settings are listed in one place, generated: a table row naming a flag or a LOGPROBS_
    variable in its first cell elsewhere would drift from the code."""
    rows = [line for line in page.read_text().splitlines() if re.match(r"\| *`(--[a-z]|LOGPROBS_)", line)]
    assert not rows, rows


def test_readme_starts_with_the_commands_ci_and_make_serve_run():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make serve", "make test"]
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ci[-1] == "make test"  # the README's test command, last, so its status is CI's

    # What make would run (its dry run), not how the Makefile spells it: serve starts the server,
    # test runs pytest with the project's own configuration and nothing else.
    def would_run(target: str) -> str:
        # Not as a sub-make of `make test` (CI's), which would print its directory around the commands.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        command = ["make", "--no-print-directory", "-n", target]
        dry = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        return dry.strip().splitlines()[-1]

    assert re.fullmatch(r"\S*\.venv/bin/logprobs-server --host \S+ --port \d+", would_run("serve"))
    assert re.fullmatch(r"(LD_PRELOAD=\S+ )?\S*\.venv/bin/python -m pytest", would_run("test"))
