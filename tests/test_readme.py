import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    test_command = next(c for c in commands if c.rstrip().endswith("pytest"))
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci_lines]
