"""CI runs the README's commands, not cousins of them: .ci/run reads them from README.md."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci/readme_commands.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands(ROOT / "README.md")


def test_readme_opens_with_a_setup_line_and_a_test_line():
    setup, tests = readme_commands()
    assert setup.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch==2.13.0 " in setup and '-e ".[dev]"' in setup
    assert setup.endswith("dist-seg demo")
    assert tests == "pytest"  # bare: everything it needs comes from pyproject.toml


def test_ci_runs_exactly_the_readme_lines():
    printed = subprocess.run(
        [sys.executable, str(ROOT / ".ci/readme_commands.py")], capture_output=True, text=True
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines() == readme_commands()
    ci = (ROOT / ".ci/run").read_text()
    assert "python3 .ci/readme_commands.py" in ci
    assert 'bash -euo pipefail -c "$setup"' in ci and 'eval "$tests"' in ci
    # no test command of its own: a second pytest line would let CI and README drift apart
    own = [ln for ln in ci.splitlines() if re.match(r"\s*(python3? -m )?pytest\b", ln)]
    assert own == []


def test_the_bare_test_command_carries_ci_settings():
    text = (ROOT / "pyproject.toml").read_text()
    config = text[text.index("[tool.pytest.ini_options]") :]
    timeout = re.search(r"^timeout = (\d+)", config, re.M)
    assert timeout and int(timeout[1]) >= 600  # pytest-timeout: a hang fails, not eats CI
    assert 'testpaths = ["tests"]' in config
    for marker in ("slow", "distributed", "slurm"):
        assert f'"{marker}: ' in config


def test_readme_says_how_to_bring_back_the_optional_tests():
    assert 'pip install -e ".[deepspeed,export]"' in (ROOT / "README.md").read_text()
    assert "deepspeed,export" in (ROOT / ".ci/run").read_text()  # CI installs them as told
