"""The command line: every command listed, and heavy modules imported only when needed."""

from __future__ import annotations

import subprocess
import sys

from dist_seg import cli

PROBE = """
import contextlib, io, sys
from dist_seg import cli
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    cli.run({argv!r})
heavy = sorted(m for m in ("torch", "matplotlib", "dist_seg.bench", "dist_seg.export",
                           "dist_seg.compare") if m in sys.modules)
print("HEAVY", ",".join(heavy))
print(out.getvalue())
"""


def _probe(argv: list[str]) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    first, _, rest = proc.stdout.partition("\n")
    assert first.startswith("HEAVY")
    return [m for m in first.removeprefix("HEAVY").strip().split(",") if m], rest


def test_top_level_help_lists_every_command_without_importing_torch():
    heavy, text = _probe(["--help"])
    assert heavy == []
    for name, (_, help_text) in cli.PLUGINS.items():
        assert name in text and help_text.split()[0] in text
    for name in ("synth", "download", "pack", "train", "evaluate", "predict", "demo"):
        assert f"    {name}" in text


def test_a_light_command_does_not_import_the_plugins():
    heavy, _ = _probe(["synth", "--help"])
    assert heavy == []


def test_a_plugin_command_imports_only_its_own_module():
    heavy, text = _probe(["compare", "--help"])
    assert "dist_seg.compare" in heavy and "dist_seg.bench" not in heavy
    assert "dist_seg.export" not in heavy and "RUN_DIR" in text


def test_parser_without_argv_has_every_plugin_command():
    parser = cli.build_parser()
    for argv in (["compare", "a"], ["bench", "data"], ["export", "--checkpoint", "c", "--format",
                 "onnx", "--out", "o"]):  # fmt: skip
        assert callable(parser.parse_args(argv).func)
