"""A tiny data-parallel training run, for tests/test_distributed.py (not a test itself).

    python tests/ddp_worker.py RUN_DIR [--exit-at STEP] [--objective trades]   # one process
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py RUN_DIR  # two, gloo on CPU

A BN-free small CNN (PyTorch's SyncBatchNorm has no CPU kernel, so a BN model's per-rank
statistics would differ from the global batch's) trained with PGD-AT on 240 MNIST images:
the attack's random start exercises the sliced step randomness. ``--exit-at S`` kills every
process abruptly (``os._exit``, no cleanup) when step S starts, as a kill -9 would.
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
                     val_alpha=0.04, val_steps=2, seed=5)


def killable(base, **kw):
    class Killable(base):
        def __init__(self, exit_at):
            super().__init__(**kw)
            self._exit_at = exit_at

        def __call__(self, model, batch, state):
            if state.step == self._exit_at:
                os._exit(3)
            return super().__call__(model, batch, state)
    return Killable


ATTACK = dict(eps=0.1, alpha=0.05, steps=2)
OBJECTIVES = {"pgd_at": (objectives.PGDAT, ATTACK),   # attack forwards, one training forward
              "trades": (objectives.TRADES, ATTACK),  # KL attack, two training forwards
              "lmt": (objectives.LMT, dict(c=0.1))}   # a bound that walks the (wrapped) model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--exit-at", type=int, default=-1)
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="pgd_at")
    args = p.parse_args()
    torch.set_num_threads(1)
    if distributed:
        distributed.init_from_env()
    ds = data.load("mnist").limit(n_train=240, n_val=40)
    torch.manual_seed(0)
    model = models.build("small_cnn", 10, mean_std=ds.mean_std, width=4)
    result = train(model, killable(OBJECTIVES[args.objective][0], **OBJECTIVES[args.objective][1])(args.exit_at), ds, CONFIG, args.run_dir, progress=False)
    if distributed is None or distributed.is_writer():
        weights = torch.load(Path(args.run_dir) / "final.pt", weights_only=True)
        print(json.dumps({"resumed_from": result.resumed_from, "history": result.history,
                          "world_size": distributed.world_size() if distributed else 1,
                          "weight_sums": {k: float(v.double().sum()) for k, v in weights.items()}}))
    if distributed:
        distributed.shutdown()


if __name__ == "__main__":
    main()
