"""The README's two Quickstart commands are the ones CI runs and the project supports."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)


def test_quickstart_has_exactly_two_one_line_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    main_job, tests = commands
    assert main_job.endswith("python -m experiments")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _quickstart_commands()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
