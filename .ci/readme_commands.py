"""The README's two opening commands (the set-up line, then the test line), and a check that
.ci/run runs each of them verbatim, so CI runs what the README tells a new user to run.

    python3 .ci/readme_commands.py            # print them, one per line
    python3 .ci/readme_commands.py --check    # exit 1 naming a README line .ci/run lacks
"""

import sys
from pathlib import Path


def readme_commands(readme: Path) -> list[str]:
    """The non-empty lines of the README's first ```bash block, comments stripped."""
    text = readme.read_text()
    start = text.index("```bash\n") + len("```bash\n")
    block = text[start : text.index("```", start)]
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip()]


def missing_from_ci(root: Path) -> list[str]:
    """README lines that are not a line of .ci/run (leading spaces aside)."""
    ci = {line.strip() for line in (root / ".ci/run").read_text().splitlines()}
    return [line for line in readme_commands(root / "README.md") if line not in ci]


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--check"]
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    lines = readme_commands(root / "README.md")
    if len(lines) != 2:
        sys.exit(f"README.md: the first bash block must hold 2 commands, found {len(lines)}")
    if "--check" in sys.argv:
        missing = missing_from_ci(root)
        if missing:
            sys.exit(f".ci/run does not run the README's command {missing[0]!r} verbatim")
    else:
        print("\n".join(lines))
