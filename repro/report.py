"""What a chapter page says about where its numbers came from, rendered from stored results."""
from __future__ import annotations

from IPython.display import Markdown

from repro import results


def training_precision(run: dict) -> str | None:
    """The precision run ``run`` trained in: the trainer's record (``metrics["training"]
    ["precision"]["amp"]``), else what the library did before it kept one (fp32 on a CPU,
    bf16 on CUDA: book/how-to-run.md), marked "(inferred)"; None for a run that trained
    nothing (an evaluation or an estimate)."""
    training = (run.get("metrics") or {}).get("training")
    if not isinstance(training, dict):
        return None
    rec = training.get("precision")
    if isinstance(rec, dict) and rec.get("amp"):
        return rec["amp"]
    device = str(run["provenance"].get("device") or "")
    return ("bf16" if device.startswith("cuda") else "fp32") + " (inferred)"


def provenance_rows(result: dict) -> list[dict]:
    rows = []
    for name, run in result["runs"].items():
        p = run["provenance"]
        rows.append({"run": name, "device": p.get("device"),
                     "training precision": training_precision(run) or "—",
                     "commit": p.get("commit"), "date": p.get("date"),
                     "wall time (s)": p.get("wall_time_s"), "torch": p.get("torch")})
    return rows


def precision_note(result: dict) -> str:
    """One sentence: which precision the runs trained in, and how to rerun them exactly."""
    counts: dict[str, int] = {}
    for run in result["runs"].values():
        amp = training_precision(run)
        if amp:
            counts[amp] = counts.get(amp, 0) + 1
    if not counts:
        return ""
    parts = ", ".join(f"{amp} ({n} run{'s' * (n != 1)})" for amp, n in sorted(counts.items()))
    how = []
    if any(a.startswith("fp32") for a in counts):
        how.append("`REPRO_AMP=fp32` reruns the fp32 runs exactly on a CPU or GPU that would "
                   "pick bf16")
    if any(a.startswith("bf16") for a in counts):
        how.append("`REPRO_AMP=bf16` the bf16 ones")
    compiled = sum(bool(((run.get("metrics") or {}).get("evaluation") or {}).get("compile"))
                   for run in result["runs"].values())
    ev = ("evaluation is fp32" + (f", compiled with torch.compile in {compiled} of them"
                                  if compiled else ""))
    return f" Training precision: {parts}; " + " and ".join(how) + f" ({ev})."


def provenance_banner(result: dict) -> Markdown:
    """A note for the top of a chapter: preset, seed, devices, commits, dates, wall time."""
    cfg = result["config"]
    rows = provenance_rows(result)
    devices = sorted({r["device"] for r in rows})
    commits = sorted({str(r["commit"]) for r in rows})
    wall = results.compute_time(
        {"folder": run.get("path", name), "wall_time_s": run["provenance"].get("wall_time_s"),
         "upstream_wall_time_s": (run.get("metrics") or {}).get("upstream_wall_time_s")}
        for name, run in result["runs"].items())["compute_wall_time_s"]
    from repro.publish import run_seeds
    from repro.scorecard import seed_words
    lines = [f"**Run:** preset `{cfg['preset']}`, {seed_words(run_seeds(cfg))}, "
             f"device {', '.join(devices)}, library commit {', '.join(commits)}, "
             f"computed {min(r['date'] for r in rows)[:10]}, {wall / 60:.1f} min of compute."
             + precision_note(result)]
    if cfg["preset"] == "smoke":
        lines.append("\n\n> **Smoke run.** Tiny data and schedules: these numbers prove that the "
                     "pipeline runs, not what the method does.")
    elif cfg["preset"] in ("laptop", "overnight", "gpu"):
        lines.append(f"\n\n> **Reduced scale** (`{cfg['preset']}` preset): shorter schedules "
                     "and/or smaller models than the paper.")
    return Markdown("".join(lines))


def sanity_text(report: dict) -> str:
    """Readable form of ``evaluate.SanityReport.to_dict()``."""
    s = report["settings"]
    flags = [c for c in report["checks"] if not c["passed"]]
    head = (f"Gradient-masking sanity report ({s.get('norm')}, eps={s.get('eps'):.5g}, "
            f"n={s.get('n')}): {'no flags' if not flags else f'{len(flags)} flag(s)'}")
    accs = "  ".join(f"{k} {100 * v:.2f}%" for k, v in report["accuracy"].items())
    checks = [f"  [{'ok' if c['passed'] else 'FLAG'}] {c['name']}: {c['message']}"
              for c in report["checks"]]
    return "\n".join([head, "  accuracy: " + accs, *checks])
