"""The package layout of docs/architecture.md: symlinked folders, banned bare imports, import direction."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True)


def test_code_folders_are_reached_through_genalign():
    import genalign.eval
    import genalign.pipelines
    import genalign.rewards

    for module, folder in ((genalign.rewards, "rewards"), (genalign.pipelines, "pipelines"), (genalign.eval, "eval")):
        assert Path(module.__file__).resolve() == (ROOT / folder / "__init__.py").resolve()
        assert (ROOT / "genalign" / folder).is_symlink()


def test_bare_top_level_imports_are_banned_by_lint(tmp_path):
    result = _ruff("check", "--select", "TID251", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    # the rule really fires on a bare import
    probe = ROOT / "tests" / "_probe_bare_import.py"
    probe.write_text("import pipelines\nfrom rewards import REWARDS\nfrom eval import x\n")
    try:
        result = _ruff("check", "--select", "TID251", "--no-cache", str(probe))
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert result.stdout.count("TID251") == 3, result.stdout


def _project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in ("genalign", "rewards", "pipelines", "eval")}


@pytest.mark.parametrize(
    "folder,allowed",
    [
        ("genalign/core", ("genalign.core",)),
        ("pipelines", ("genalign.core", "genalign.pipelines")),
        ("rewards", ("genalign.core", "genalign.rewards")),
        ("eval", ("genalign.core", "genalign.eval")),
        ("genalign/finetuners", ("genalign.core", "genalign.finetuners")),
        ("genalign/shapes", ("genalign.core", "genalign.shapes", "genalign.pipelines", "genalign.rewards")),
    ],
)
def test_import_direction(folder, allowed):
    for path in (ROOT / folder).rglob("*.py"):
        for name in _project_imports(path):
            assert name.startswith(allowed), f"{path.relative_to(ROOT)} imports {name}"


def test_whole_tree_passes_lint():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in readme and "<!-- main-command -->" in readme
    assert "README.md" in script and "test-command" in script and "HF_HUB_OFFLINE=1" in script
