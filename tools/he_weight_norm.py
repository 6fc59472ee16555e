# Run from the repository root: PYTHONPATH=. python tools/he_weight_norm.py SEED (about 1.5 min
# on a shared 2-core CPU). Numbers quoted in repro/models/heads.py (HypersphereHead).
"""Cheap measurement: PGD-AT+HE with the head's rows projected each forward (official) vs
normalised in the graph, same init, data order and attacks. MNIST small_cnn."""
import sys
import time
import torch
from repro import attacks, data, losses, models, objectives
from repro.objectives import Batch, StepState

torch.set_num_threads(1)
ds = data.load("mnist")
n_train, steps, bs = 4000, 400, 64
x_tr = data.to_float(ds.x_train[:n_train]); y_tr = ds.y_train[:n_train]
x_te = data.to_float(ds.x_test[:500]); y_te = ds.y_test[:500]
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
res = {}
for wn in ("project", "graph"):
    torch.manual_seed(seed)
    head = "hypersphere" if wn == "project" else "hypersphere_graph"
    model = models.build("small_cnn", 10, mean_std=ds.mean_std, width=8, head=head)
    obj = objectives.pgd_at(eps=0.1, alpha=0.04, steps=3, he=losses.HE(10, 0.2, wn))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    w_start = torch.nn.functional.normalize(model.head.weight.detach().clone(), dim=1)
    t0 = time.time()
    norms = []
    for step in range(steps):
        idx = torch.randint(0, n_train, (bs,), generator=g)
        model.train()
        loss, _ = obj(model, Batch(x_tr[idx], y_tr[idx], idx), StepState(0, step, steps, steps, torch.Generator().manual_seed(step)))
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 100 == 99:
            norms.append(round(model.head.weight.detach().norm(dim=1).mean().item(), 3))
    model.eval()
    with torch.no_grad():
        clean = (model(x_te).argmax(1) == y_te).float().mean().item()
    x_adv = attacks.pgd(model, x_te, y_te, eps=0.1, alpha=0.025, steps=10, loss="cw", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rob = (model(x_adv).argmax(1) == y_te).float().mean().item()
    w_end = torch.nn.functional.normalize(model.head.weight.detach(), dim=1)
    drift = torch.rad2deg(torch.acos((w_start * w_end).sum(1).clamp(-1, 1))).mean().item()
    res[wn] = dict(clean=clean, cw_pgd10=rob, head_row_norm_every100=norms, head_angle_moved_deg=round(drift, 1), seconds=round(time.time() - t0, 1))
    print(seed, wn, res[wn], flush=True)
