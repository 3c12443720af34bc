"""Print the section of CHANGELOG.md for a release tag: its release notes.

    python scripts/release_notes.py v0.1.0        # the body of "## [0.1.0] - <date>"
    python scripts/release_notes.py Unreleased    # what the next release will say

Exits 1 with a message on stderr when CHANGELOG.md has no such section or it is empty
(a tag must not be released before its section is written).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CHANGELOG = Path(__file__).resolve().parent.parent / "CHANGELOG.md"
HEADING = re.compile(r"^## \[(?P<name>[^\]]+)\]")
LINK_DEFINITION = re.compile(r"^\[[^\]]+\]: \S+")


class NoSection(LookupError):
    """CHANGELOG.md has no (or an empty) section for the version asked."""


def section(text: str, tag: str) -> str:
    """The body of the `## [version]` section for `tag` (`v1.2.3`, `1.2.3` or `Unreleased`),
    without its heading and without the link definitions that end the file."""
    name = tag.removeprefix("v") if re.fullmatch(r"v\d.*", tag) else tag
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if HEADING.match(line)]
    for n, start in enumerate(starts):
        match = HEADING.match(lines[start])
        if match is None or match["name"].lower() != name.lower():
            continue
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = [line for line in lines[start + 1 : end] if not LINK_DEFINITION.match(line)]
        notes = "\n".join(body).strip()
        if not notes:
            raise NoSection(f"the section [{name}] of CHANGELOG.md is empty")
        return notes + "\n"
    raise NoSection(f"CHANGELOG.md has no section [{name}] (a heading `## [{name}] - DATE`)")


def main(argv: list[str] | None = None) -> int:
    """Print the notes of one tag."""
    parser = argparse.ArgumentParser(description="Print the CHANGELOG.md section of a tag.")
    parser.add_argument("tag", help="a release tag (v0.1.0) or Unreleased")
    parser.add_argument("--changelog", type=Path, default=CHANGELOG)
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(section(args.changelog.read_text(), args.tag))
    except NoSection as exc:
        print(f"release_notes: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
