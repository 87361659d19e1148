"""CI runs the README's commands, not cousins of them (.ci/run, .ci/readme_commands.py)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = [sys.executable, str(ROOT / ".ci/readme_commands.py"), "--check"]


def commands_module():
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci/readme_commands.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_opens_with_a_setup_line_and_a_test_line():
    setup, tests = commands_module().readme_commands(ROOT / "README.md")
    assert setup.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch==2.13.0 " in setup and '-e ".[dev]"' in setup
    assert setup.endswith("dist-seg demo")
    assert tests == "pytest"  # bare: everything it needs comes from pyproject.toml


def test_ci_runs_both_readme_lines_verbatim_and_no_other_test_command():
    assert subprocess.run([*CHECK, str(ROOT)], capture_output=True).returncode == 0
    ci = (ROOT / ".ci/run").read_text()
    assert ci.index("readme_commands.py --check") < ci.index("\npytest\n")  # checked first
    tests = [ln for ln in ci.splitlines() if re.match(r"\s*(python3? -m )?pytest\b", ln)]
    assert tests == ["pytest"]


def test_the_check_fails_when_readme_and_ci_drift_apart(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci/run", tmp_path / ".ci/run")
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme.replace("\npytest\n", "\npytest -x\n", 1))
    drift = subprocess.run([*CHECK, str(tmp_path)], capture_output=True, text=True)
    assert drift.returncode == 1
    assert "does not run the README's command 'pytest -x' verbatim" in drift.stderr


def test_the_bare_test_command_carries_ci_settings():
    text = (ROOT / "pyproject.toml").read_text()
    config = text[text.index("[tool.pytest.ini_options]") :]
    timeout = re.search(r"^timeout = (\d+)", config, re.M)
    assert timeout and int(timeout[1]) >= 600  # pytest-timeout: a hang fails, not eats CI
    assert 'testpaths = ["tests"]' in config
    for marker in ("slow", "distributed", "slurm"):
        assert f'"{marker}: ' in config


def test_ci_installs_the_optional_extras_as_the_readme_says():
    assert 'pip install -e ".[deepspeed,export]"' in (ROOT / "README.md").read_text()
    assert 'pip install --quiet -e ".[deepspeed,export]"' in (ROOT / ".ci/run").read_text()
