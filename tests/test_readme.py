"""The README and docs/ tell the truth: about the settings model, and about where their links go.

The README is what a newcomer reads first (short, linking every docs page); the reference lives
in docs/, one page per subject. Links are checked as GitHub renders them: a relative link must
name an existing file, and a `#anchor` an existing heading of that file.
"""

from __future__ import annotations

import re
from pathlib import Path

from toybox_backupd.core.settings import DESCRIPTIONS, Settings, markdown_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(#{1,6}) +(.+?) *#* *$")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor: lowercase, punctuation removed but `-` and `_`, spaces become `-`."""
    text = re.sub(r"`|\*\*|\*", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2... as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The relative links of a page (web addresses and mail links left out)."""
    targets = LINK.findall("\n".join(prose_lines(path.read_text(encoding="utf-8"))))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    return broken


def test_readme_is_short() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines; the reference belongs in docs/"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    assert list(DOCS.glob("*.md")), "no docs/*.md pages"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if t.partition("#")[0]}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


def test_every_relative_link_and_anchor_exists() -> None:
    broken = {str(p.relative_to(ROOT)): broken_links(p) for p in pages()}
    broken = {page: found for page, found in broken.items() if found}
    assert not broken, f"broken links: {broken}"


def test_anchors_follow_githubs_rules() -> None:
    assert slug("Files in `BACKUP_DIR`") == "files-in-backup_dir"
    assert slug("Point-in-time recovery (PITR)") == "point-in-time-recovery-pitr"
    assert slug("1. The database is broken: back (1–5 minutes)") == "1-the-database-is-broken-back-15-minutes"
    assert slug("Yesterday's uploads") == "yesterdays-uploads"


def test_configuration_page_settings_table_is_generated_from_the_model() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    hint = "run: python -m toybox_backupd.core.settings, paste the table into docs/configuration.md"
    assert markdown_table() in page, hint


def test_every_setting_is_described_and_in_env_example() -> None:
    aliases = {field.alias for field in Settings.model_fields.values()}
    assert aliases == set(DESCRIPTIONS)
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    missing = [a for a in sorted(aliases) if f"{a}=" not in text]
    assert not missing, f".env.example lacks {missing}"
