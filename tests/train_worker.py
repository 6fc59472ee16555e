"""A tiny training run in its own process, for the kill-and-resume test (not a test itself).

    python tests/train_worker.py RUN_DIR [--step-delay SECONDS] [--checkpoint-every STEPS]
                                         [--die-at-step STEP]
"""
import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repro import data, models, objectives  # noqa: E402
from repro.train import TrainConfig, train  # noqa: E402

CONFIG = TrainConfig(epochs=3, batch_size=20, optimizer="sgd", lr=0.05, momentum=0.9,
                     weight_decay=5e-4, schedule="multistep", milestones=(0.5, 0.8), augment=False,
                     checkpoint_every=3, val_every=1, val_size=60, val_eps=0.1, val_alpha=0.04,
                     val_steps=3, seed=3)


class Slowed(objectives.FGSMRS):
    """FGSM-RS that sleeps a little per step, so the parent can kill the run mid-way, and
    that can SIGKILL its own process when it reaches step ``die_at`` (0-based, before that
    step's update): a kill at an exactly known point, e.g. just after an epoch-end checkpoint."""

    def __init__(self, delay, die_at=None):
        super().__init__(eps=0.1, alpha=0.125)
        self._delay, self._die_at = delay, die_at

    def __call__(self, model, batch, state):
        if state.step == self._die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self._delay)
        return super().__call__(model, batch, state)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--checkpoint-every", type=int, default=CONFIG.checkpoint_every)
    p.add_argument("--die-at-step", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = data.load("mnist").limit(n_train=400, n_val=60)
    torch.manual_seed(0)
    model = models.build("small_cnn", 10, mean_std=ds.mean_std, width=4)
    cfg = dataclasses.replace(CONFIG, checkpoint_every=args.checkpoint_every)  # resume-free
    result = train(model, Slowed(args.step_delay, args.die_at_step), ds, cfg, args.run_dir,
                   progress=False)
    print("resumed_from", result.resumed_from)


if __name__ == "__main__":
    main()
