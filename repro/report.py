"""What a chapter page says about where its numbers came from, rendered from stored results."""
from __future__ import annotations

from IPython.display import Markdown

from repro import results


def provenance_rows(result: dict) -> list[dict]:
    rows = []
    for name, run in result["runs"].items():
        p = run["provenance"]
        rows.append({"run": name, "device": p.get("device"), "commit": p.get("commit"),
                     "date": p.get("date"), "wall time (s)": p.get("wall_time_s"),
                     "torch": p.get("torch")})
    return rows


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
    lines = [f"**Run:** preset `{cfg['preset']}`, seed {cfg.get('seed')}, "
             f"device {', '.join(devices)}, library commit {', '.join(commits)}, "
             f"computed {min(r['date'] for r in rows)[:10]}, {wall / 60:.1f} min of compute."]
    if cfg["preset"] == "smoke":
        lines.append("\n\n> **Smoke run.** Tiny data and schedules: these numbers prove that the "
                     "pipeline runs, not what the method does.")
    elif cfg["preset"] in ("laptop", "gpu"):
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
