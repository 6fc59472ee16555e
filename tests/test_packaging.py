"""Install metadata stays consistent, and the library never needs torchvision."""
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import repro

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    pip_lines, in_pip = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.strip() == "- pip:":
            in_pip = True
        elif in_pip and line.strip().startswith("- "):
            pip_lines.append(line.strip()[2:])
    have = {_norm(r) for r in pip_lines if r.strip() != "-e ."}
    assert have == wanted, f"only in environment.yml: {have - wanted}; only in pyproject: {wanted - have}"
    assert "torch==2.13.0" in wanted


def test_every_module_imports_without_torchvision():
    modules = sorted(m.name for m in pkgutil.walk_packages(repro.__path__, "repro.")
                     if m.name != "repro.__main__")
    # A torchvision that fails at import time, as the PyPI wheels do on a CPU-only torch.
    code = (
        "import sys, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torchvision':\n"
        "            raise ImportError('libcudart.so: cannot open shared object file')\n"
        "sys.meta_path.insert(0, Broken())\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "assert 'torchvision' not in sys.modules\nprint('ok', len(" + repr(modules) + "))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make book" in ci


def test_published_files_are_not_git_ignored():
    """A published chapter must reach a fresh clone whole (a stray ignore pattern once
    dropped every book/published/*/results/ folder)."""
    published = ROOT / "book" / "published"
    files = [str(p.relative_to(ROOT)) for p in published.rglob("*") if p.is_file()]
    if not files or not (ROOT / ".git").exists():
        pytest.skip("no published files or not a git checkout: nothing to check")
    out = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(files),
                         capture_output=True, text=True, cwd=ROOT)
    ignored = [f for f in out.stdout.splitlines() if not f.endswith(".tmp")]
    assert not ignored, f"ignored by .gitignore, so missing from a clone: {ignored[:5]}"
