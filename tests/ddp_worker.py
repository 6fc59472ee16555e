"""Tiny data-parallel training runs, for tests/test_distributed.py (not a test itself).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py --suite OUT \\
        [--experiment-results RESULTS -- EXPERIMENT ARGS...]   # the test's one spawn
    python tests/ddp_worker.py RUN_DIR [--objective trades]   # one run, one process

``--suite`` runs, in one process group (one spawn shared by the test's assertions: each
``torchrun`` costs a Python start and a torch import per process), the PGD-AT, TRADES and LMT
runs into ``OUT/<objective>``, then a PGD-AT run stopped on every rank when step 5 starts
and resumed into ``OUT/resumed``; rank 0 writes ``OUT/report.json``. With
``--experiment-results`` it then runs ``python -m repro experiment ARGS`` (``cli.main``, in
the same processes) with ``REPRO_RESULTS=RESULTS``. ``test_distributed`` runs the
one-process counterparts with ``run`` in its own process.

A BN-free small CNN (PyTorch's SyncBatchNorm has no CPU kernel, so a BN model's per-rank
statistics would differ from the global batch's) trained for 2 epochs of 3 steps on 120 MNIST
images: the PGD attack's random start exercises the sliced step randomness. The stop raises
``Stopped`` in the objective before step 5 touches anything; ``train`` has no handler that
writes on an exception (its one ``finally`` closes the progress bar), so the folder is left
as a kill would leave it (tests/test_train.py kills a real process with SIGKILL).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("REPRO_TREE", str(Path(__file__).resolve().parents[1])))
from repro import data, models, objectives  # noqa: E402
try:
    from repro import distributed  # noqa: E402
except ImportError:  # the library before data parallelism (REPRO_TREE=<old checkout>), which
    distributed = None  # recorded test_distributed.REFERENCE
from repro.train import TrainConfig, train  # noqa: E402

CONFIG = TrainConfig(epochs=2, batch_size=40, optimizer="sgd", lr=0.05, momentum=0.9,
                     weight_decay=5e-4, schedule="multistep", milestones=(0.5, 0.8),
                     augment=True, checkpoint_every=2, val_every=1, val_size=40, val_eps=0.1,
                     val_alpha=0.04, val_steps=2, seed=5, amp="fp32")
# amp="fp32", not "auto": these runs are compared for equality (N = 1 vs N = 2, resumed vs
# uninterrupted) and against REFERENCE, recorded in fp32; "auto" would train in bf16 on a CPU
# with native bf16 and in fp32 elsewhere.
STOP_AT = 5   # the last checkpoint before it: step 4 (checkpoint_every=2), after the
              # epoch-end one at step 3

ATTACK = dict(eps=0.1, alpha=0.05, steps=2)
OBJECTIVES = {"pgd_at": (objectives.PGDAT, ATTACK),   # attack forwards, one training forward
              "trades": (objectives.TRADES, ATTACK),  # KL attack, two training forwards
              "lmt": (objectives.LMT, dict(c=0.1))}   # a bound that walks the (wrapped) model


class Stopped(Exception):
    """Raised on every rank when step ``stop_at`` starts."""


def stoppable(base, **kw):
    class Stoppable(base):
        def __init__(self, stop_at):
            super().__init__(**kw)
            self._stop_at = stop_at

        def __call__(self, model, batch, state):
            if state.step == self._stop_at:
                raise Stopped(state.step)
            return super().__call__(model, batch, state)
    return Stoppable


def _is_writer() -> bool:
    return distributed is None or distributed.is_writer()


def dataset():
    return data.load("mnist").limit(n_train=120, n_val=40)


def initial_model(ds=None):
    """The model every run starts from (the same initial weights on every rank)."""
    ds = dataset() if ds is None else ds
    torch.manual_seed(0)
    return models.build("small_cnn", 10, mean_std=ds.mean_std, width=4)


def run(run_dir, objective: str = "pgd_at", stop_at: int = -1) -> dict | None:
    """One training run into ``run_dir`` (data-parallel inside a process group); rank 0
    (or the single process) returns its history, resume step and final weights' sums."""
    ds = dataset()
    model = initial_model(ds)
    cls, kw = OBJECTIVES[objective]
    result = train(model, stoppable(cls, **kw)(stop_at), ds, CONFIG, run_dir, progress=False)
    if not _is_writer():
        return None
    weights = torch.load(Path(run_dir) / "final.pt", weights_only=True)
    return {"resumed_from": result.resumed_from, "history": result.history,
            "world_size": distributed.world_size() if distributed else 1,
            "weight_sums": {k: float(v.double().sum()) for k, v in weights.items()}}


def suite(out: Path) -> dict:
    report = {name: run(out / name, name) for name in OBJECTIVES}
    stopped = out / "resumed"
    try:
        run(stopped, "pgd_at", stop_at=STOP_AT)
        report["stop"] = "not stopped"
    except Stopped as e:
        report["stop"] = f"stopped at step {e.args[0]}"
    report["after_stop"] = sorted(p.name for p in stopped.iterdir())
    distributed.barrier()  # rank 0 listed the folder before any rank resumes into it
    report["resumed"] = run(stopped, "pgd_at")
    return report


def main():
    argv = sys.argv[1:]
    experiment = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="pgd_at")
    p.add_argument("--suite", help="OUT: the test's runs, under torchrun")
    p.add_argument("--experiment-results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.suite is None:   # one run (how REFERENCE was recorded, with REPRO_TREE)
        print(json.dumps(run(args.run_dir, args.objective)))
        return
    distributed.init_from_env()
    out = Path(args.suite)
    report = suite(out)
    if distributed.is_writer():
        (out / "report.json").write_text(json.dumps(report))
    if args.experiment_results:
        from repro import cli
        os.environ["REPRO_RESULTS"] = args.experiment_results
        code = cli.main(["experiment", *experiment])   # it shuts the process group down
        if code:
            sys.exit(code)
    distributed.shutdown()


if __name__ == "__main__":
    main()
