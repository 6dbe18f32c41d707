"""A benchmark's section of bench/README.md: its latest table between two markers.

Every benchmark prints the machine it ran on and, with ``--readme``, writes its latest table
between ``<!-- bench.NAME: begin -->`` and ``<!-- bench.NAME: end -->`` (one command, no paste).
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).parent / "README.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench.{name}: begin -->", f"<!-- bench.{name}: end -->"


def write_section(name: str, body: str, path: Path = README) -> None:
    """Replace the text between ``name``'s markers; a README without them is an error, not an append."""
    begin, end = markers(name)
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path} has no single {begin} ... {end} section to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")


def publish(name: str, body: str, *, readme: bool) -> None:
    """A benchmark's last step: print its section and, with ``--readme``, write it between its
    markers in :data:`README`."""
    print()
    print(body)
    if readme:
        write_section(name, body, README)
        print(f"written into {README} (bench.{name})")
