"""The README's two set-up commands are the ones CI runs and the CLI really offers."""

from __future__ import annotations

import re

from conftest import REPO


def _commands(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    block = ci.split("# --- README: tests ---\n")[1].split("# --- end ---")[0].strip()
    assert block in [c.strip() for c in _commands(readme)]
    assert "pytest" in block


def test_readme_main_command_is_a_real_command():
    from click.testing import CliRunner

    from protoad_export.cli import main

    readme = (REPO / "README.md").read_text()
    main_job = next(c for c in _commands(readme) if "protoad-export" in c and "pytest" not in c)
    sub = main_job.split("protoad-export ")[1].split()[0]
    result = CliRunner().invoke(main, [sub, "--help"])
    assert result.exit_code == 0, result.output
