"""Every chapter notebook runs at the smoke preset through papermill, and bad parameters stop
it before any work starts (through papermill directly and through ``python -m repro run``)."""
import json

import papermill
import pytest

from repro import cli, experiments

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


BAD_PARAMETERS = [
    ({"preset": "smoke", "epochz": 2}, ("'epochz'", "epochs (int)", "eps (float)")),
    ({"preset": "smoke", "epochs": "two"}, ("'epochs'", "must be int")),
    ({"preset": "huge"}, ("unknown preset 'huge'", "smoke", "laptop", "gpu", "paper")),
]


def test_bad_parameters_stop_the_notebook(tmp_path):
    """Through papermill and a kernel, once: the validation cell raises and nothing after it
    runs (the same cell stops every bad parameter; the next test checks each message)."""
    parameters, fragments = BAD_PARAMETERS[0]
    _fails_before_work("intro", parameters, tmp_path, *fragments)


@pytest.mark.parametrize("parameters,fragments", BAD_PARAMETERS)
def test_the_validation_cell_names_each_bad_parameter(parameters, fragments, notebook_namespace):
    """The notebook's validation cell (``params.from_notebook``) on the globals papermill's
    injected cell leaves, without a kernel: the error a reader sees for each bad parameter."""
    from repro import params
    from repro.experiments import intro
    nb = json.loads(experiments.notebook_path("intro").read_text())
    validation = next(c for c in nb["cells"] if "from_notebook" in "".join(c["source"]))
    assert "params.from_notebook(intro.SPEC, globals())" in "".join(validation["source"])
    with pytest.raises(params.ParameterError) as e:
        params.from_notebook(intro.SPEC, notebook_namespace("intro", parameters))
    for fragment in fragments:
        assert fragment in str(e.value)


# `python -m repro run|params` through cli.main, in this process (a `python -m repro`
# subprocess re-imports torch; tests/test_cli.py keeps one end to end)

@pytest.mark.parametrize("args,fragment", [
    (["-p", "epochz", "2"], "unknown parameter 'epochz'"),
    (["-p", "epochs", "2.5"], "'epochs' must be int"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_run_validates_before_executing(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda *a, **k: pytest.fail("run executed the notebook"))
    out = tmp_path / "never.ipynb"
    assert cli.main(["run", "intro", *args, "--output", str(out)]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_cli_lists_parameters(capsys):
    assert cli.main(["params", "intro"]) == 0
    out = capsys.readouterr().out
    assert "eps (float)" in out and "laptop:" in out
