"""Every chapter notebook runs at the smoke preset through papermill, and bad parameters stop
it before any work starts (through papermill directly and through ``python -m repro run``)."""
import json
import subprocess
import sys

import papermill
import pytest

from repro import experiments

ROOT = experiments.PROJECT_ROOT
CHAPTERS = list(experiments.CHAPTERS)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_declares_exactly_the_chapter_parameters(chapter):
    nb = experiments.notebook_path(chapter)
    declared = papermill.inspect_notebook(str(nb))
    spec = experiments.get(chapter).SPEC
    assert list(declared)[0] == "preset"
    assert set(declared) == {"preset", *spec.by_name}
    cells = json.loads(nb.read_text())["cells"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells
                   if c["cell_type"] == "code"), "notebook sources carry no outputs"


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_notebook_executes_at_smoke(chapter, tmp_path, data_root):
    out = tmp_path / f"{chapter}.ipynb"
    papermill.execute_notebook(str(experiments.notebook_path(chapter)), str(out),
                               parameters={"preset": "smoke"}, progress_bar=False,
                               cwd=str(experiments.NOTEBOOKS))
    cells = json.loads(out.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs), "the chapter draws figures"


def _fails_before_work(chapter, parameters, tmp_path, *fragments):
    out = tmp_path / "bad.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(experiments.notebook_path(chapter)), str(out),
                                   parameters=parameters, progress_bar=False,
                                   cwd=str(experiments.NOTEBOOKS))
    assert e.value.ename == "ParameterError"
    for fragment in fragments:
        assert fragment in e.value.evalue
    # It stopped at the validation cell: nothing after it ran.
    cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    failed = next(i for i, c in enumerate(cells)
                  if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert "from_notebook" in "".join(cells[failed]["source"])
    assert all(c.get("execution_count") is None for c in cells[failed + 1:])


@pytest.mark.parametrize("parameters,fragments", [
    ({"preset": "smoke", "epochz": 2}, ("'epochz'", "epochs (int)", "eps (float)")),
    ({"preset": "smoke", "epochs": "two"}, ("'epochs'", "must be int")),
    ({"preset": "huge"}, ("unknown preset 'huge'", "smoke", "laptop", "gpu", "paper")),
])
def test_bad_parameters_stop_the_notebook(parameters, fragments, tmp_path):
    _fails_before_work("intro", parameters, tmp_path, *fragments)


@pytest.mark.parametrize("args,fragment", [
    (["-p", "epochz", "2"], "unknown parameter 'epochz'"),
    (["-p", "epochs", "2.5"], "'epochs' must be int"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_run_validates_before_executing(args, fragment, tmp_path):
    out = tmp_path / "never.ipynb"
    proc = subprocess.run([sys.executable, "-m", "repro", "run", "intro", *args, "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and fragment in proc.stderr
    assert not out.exists()


def test_cli_lists_parameters():
    proc = subprocess.run([sys.executable, "-m", "repro", "params", "intro"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "eps (float)" in proc.stdout and "laptop:" in proc.stdout
