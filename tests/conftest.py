"""Shared fixtures: real datasets prepared from ../shared/data (never synthetic stand-ins)."""
import numpy as np
import pytest
import torch

from repro import data

# One intra-op thread for the whole session: the tests use tiny models, where a second thread
# only adds synchronisation (measured 10-25x slower on a busy 2-core machine), and a fixed
# thread count keeps floating-point results repeatable. Notebooks run in their own kernels.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root():
    root = data.data_root()
    missing = [n for n in data.NAMES if not (root / f"{n}.npz").exists()]
    if missing:
        data.prepare_offline(root, missing)
    return root


def _has(path, array: str) -> bool:
    with np.load(path) as f:   # closed before prepare_offline may rewrite the file
        return array in f.files


def _dataset(name):
    # only the dataset asked for: a GPU window stages just the ones its pieces need, and
    # tests/test_cuda.py runs there with MNIST and CIFAR-10 alone
    root = data.data_root()
    path = root / f"{name}.npz"
    # a CIFAR-10 copy written before official_index_train existed is rewritten (prepare.py
    # does that for a file that lacks an array of the offline copy)
    if not path.exists() or (name == "cifar10" and not _has(path, "official_index_train")):
        data.prepare_offline(root, [name])
    return data.load(name, root)


@pytest.fixture(scope="session")
def mnist():
    return _dataset("mnist")


@pytest.fixture(scope="session")
def cifar10():
    return _dataset("cifar10")


@pytest.fixture(scope="session")
def cifar100():
    return _dataset("cifar100")


@pytest.fixture(scope="session")
def notebook_namespace():
    """``f(chapter, parameters)``: the globals of the real notebook after its parameters cell
    and, if ``parameters`` is not None, the cell papermill injects for them (papermill's own
    parameterize_notebook), without a kernel."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from repro import experiments

    def namespace(chapter: str, parameters: dict | None) -> dict:
        nb = load_notebook_node(str(experiments.notebook_path(chapter)))
        if parameters is not None:
            nb = parameterize_notebook(nb, parameters)
        ns = {}
        for cell in nb.cells:
            tags = cell.metadata.get("tags", [])
            if "parameters" in tags or "injected-parameters" in tags:
                exec(cell.source, ns)
        return ns
    return namespace
