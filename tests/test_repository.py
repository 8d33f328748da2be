"""The newcomer's promises: .ci/run runs exactly README's test command; the quick start names real files."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = readme_block("Run the tests")
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines


def test_quick_start_script_exists_and_uses_bundled_samples():
    command = readme_block("Quick start")
    script = ROOT / command.split()[-1]
    assert script.exists()
    for sample in re.findall(r"onnxplain/default_model/samples/(\w+)\.png", script.read_text()):
        assert (ROOT / "onnxplain" / "default_model" / "samples" / f"{sample}.png").exists()
