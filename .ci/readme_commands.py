"""Print the README's two opening commands, one per line: the set-up line, then the test line.

.ci/run executes exactly these lines, so CI runs what the README tells a new user to run
(tests/test_readme.py checks that both stay in this shape).
"""

import sys
from pathlib import Path


def readme_commands(readme: Path) -> list[str]:
    """The non-empty lines of the README's first ```bash block, comments stripped."""
    text = readme.read_text()
    start = text.index("```bash\n") + len("```bash\n")
    block = text[start : text.index("```", start)]
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip()]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    lines = readme_commands(root / "README.md")
    if len(lines) != 2:
        sys.exit(f"README.md: the first bash block must hold 2 commands, found {len(lines)}")
    print("\n".join(lines))
