"""Every saved benchmark result is listed in the results index, so the README's figures are
found at once and nothing uncited piles up there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def index_patterns() -> list[re.Pattern[str]]:
    """The file names of the index's first column, as regular expressions: ``<server>`` is
    one of the benchmark's servers, ``<mode>`` any name, ``{a,b}`` either, ``[...]``
    optional, ``*`` anything."""
    patterns = []
    for line in (RESULTS / "README.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            regex = re.escape(name)
            regex = regex.replace("<server>", "(hypercorn-asyncio|hypercorn-trio|uvicorn)")
            regex = re.sub(r"<[a-z]+>", "[a-z0-9-]+", regex)
            regex = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m[1].replace(",", "|") + ")", regex)
            regex = regex.replace(r"\[", "(").replace(r"\]", ")?").replace(r"\*", ".*")
            patterns.append(re.compile(regex))
    return patterns


def test_every_saved_result_is_in_the_index() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "."], cwd=RESULTS, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(tracked) > 10, "benchmarks/results is not where this test looks"
    patterns = index_patterns()
    unlisted = [f for f in tracked if not any(p.fullmatch(f) for p in patterns)]
    assert unlisted == []
