"""Publish a chapter: its executed notebook and the small files of the runs behind it go to
``book/published/<chapter>/``, with a publication record; the book renders that copy.

    python -m repro publish intro --preset laptop [-p name value ...]

1. runs the chapter's experiment in-process (``run(preset, **overrides)``: finished runs come
   from the cache, so publishing after ``python -m repro experiment`` recomputes nothing);
2. executes the notebook with papermill at the same parameters (again from the cache);
3. copies the notebook and, for every run in the result's ``runs``, the run folder's small
   files (``SMALL_FILES``; never checkpoints) into ``book/published/<chapter>/results/``;
4. writes ``publication.json``: preset, overrides, seed, devices, library commit(s), dates,
   wall times, and the files with their sizes.

``results.find_run`` searches ``book/published/<chapter>/results/`` too, so a published run is
reused on any machine; ``load`` rebuilds the chapter's result dict from the published folder
alone (the scorecard uses it; nothing is recomputed).

GPU machines have no papermill: there, run ``python -m repro experiment CHAPTER --preset gpu``,
bring back the run folders' small files into ``results/<chapter>/`` on a CPU machine, and
publish there (the cache finds them; the notebook executes on the CPU from stored results).
"""
from __future__ import annotations

import datetime as _dt
import inspect
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from repro import experiments, results
from repro.data import PROJECT_ROOT

SMALL_FILES = ("config.json", "metrics.json", "arrays.npz", "provenance.json", "DONE",
               "train/metrics.jsonl", "train/result.json")
MAX_BYTES = 2_000_000  # per chapter: the book's repository stays small
RECORD = "publication.json"


class PublishError(RuntimeError):
    pass


def published_dir(chapter: str, root: Path | None = None) -> Path:
    return Path(root or results.PUBLISHED_ROOT) / chapter


def copy_run(src: Path, dst: Path) -> list[str]:
    """Copy a run folder's small files (never checkpoints); returns the copied paths."""
    if not (src / "DONE").exists():
        raise PublishError(f"run {src} is not finished (no DONE file)")
    copied = []
    for rel in SMALL_FILES:
        f = src / rel
        if f.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / rel)
            copied.append(rel)
    return copied


def keep_other_runs(old_results: Path, new_results: Path, preset: str | None = None,
                    partial: bool = False, used_before: set[str] = frozenset()) -> list[str]:
    """Carry the finished runs of an earlier publication that this one does not use (another
    preset's runs, runs ingested from a GPU campaign and not yet published) into the new
    ``results/`` folder, so that republishing one preset never deletes computed results the
    cache would otherwise recompute. A folder counts as a finished run only with its ``DONE``
    file and a ``config.json`` whose key matches the folder name; anything else is dropped.
    Runs of ``preset`` itself are superseded by this publication and dropped (an earlier
    configuration of the same preset, e.g. before the preset was resized): those whose config
    records ``preset``, and ``used_before``, the folders the earlier publication of the same
    preset showed (chapters whose run keys leave the preset out); with ``partial``
    (the publication overrides parameters, e.g. one dataset of several) only those whose run
    name this publication recomputed are.
    Returns the kept folder names (they are not part of this publication's ``files``)."""
    kept = []
    if not old_results.is_dir():
        return kept
    new_names = {f.name.rsplit("-", 1)[0] for f in new_results.iterdir()} \
        if new_results.is_dir() else set()
    for folder in sorted(old_results.iterdir()):
        if (new_results / folder.name).exists() or not (folder / "DONE").is_file():
            continue
        try:
            config = json.loads((folder / "config.json").read_text())
            key = results.config_key(config)
        except (OSError, ValueError):
            continue
        if not folder.name.endswith(f"-{key}"):
            continue
        same_preset = (preset is not None and config.get("preset") == preset) \
            or folder.name in used_before
        if same_preset and (not partial or folder.name.rsplit("-", 1)[0] in new_names):
            continue  # superseded by this publication of the same preset
        shutil.copytree(folder, new_results / folder.name)
        kept.append(folder.name)
    return kept


def _used_by(dest: Path, preset: str) -> set[str]:
    """The run folders the publication in ``dest`` showed, if it was one of ``preset``."""
    try:
        record = json.loads((dest / "publication.json").read_text())
    except (OSError, ValueError):
        return set()
    if record.get("preset") != preset:
        return set()
    return {Path(r["folder"]).name for r in record.get("runs", {}).values() if "folder" in r}


def _relativise_outputs(nb_path: Path) -> None:
    """Published notebooks must not show this machine's absolute paths (cache log lines)."""
    text = nb_path.read_text()
    for prefix in {str(PROJECT_ROOT) + "/", str(PROJECT_ROOT.resolve()) + "/"}:
        text = text.replace(prefix, "")
    nb_path.write_text(text)


def prepare_for_book(src: Path, dst: Path, source: Path | None = None,
                     chapter: str | None = None, log=print) -> Path:
    """Copy an executed chapter notebook to where the book renders it, tidied for readers:
    the source's parameters cell (all ``...``) is removed from the page (papermill's
    injected-parameters cell, which shows the values actually used, stays), this machine's
    absolute paths become relative, the source notebook's display tags and prose apply
    (``sync_from_source``, with ``source``), and the chapter's verdict box goes under its
    introduction (``repro.verdicts``, with ``chapter``)."""
    nb = json.loads(Path(src).read_text())
    if source is not None and Path(source).exists():
        for note in sync_from_source(nb, json.loads(Path(source).read_text())):
            log(f"  {Path(dst).name}: {note}")
    injected = any("injected-parameters" in c.get("metadata", {}).get("tags", [])
                   for c in nb["cells"])
    for cell in nb["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if injected and "parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    if chapter is not None:
        from repro import verdicts
        verdicts.insert_box(nb, chapter)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    _relativise_outputs(dst)
    return dst


# Cell tags that decide what a page shows (Jupyter Book / myst-nb); other tags (parameters,
# injected-parameters) belong to the execution and are never touched.
DISPLAY_TAGS = ("hide-input", "hide-output", "hide-cell", "remove-input", "remove-output",
                "remove-cell")
GLUE_REF = re.compile(r"\{glue(?::\w+)?\}`([^`:<]+)")


def glued_names(nb: dict) -> set[str]:
    """The names a notebook's outputs glued (``myst_nb.glue``)."""
    return {o["metadata"]["scrapbook"]["name"] for c in nb["cells"]
            for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}


def sync_from_source(nb: dict, source: dict) -> list[str]:
    """Bring an executed notebook's presentation up to date with its source, in place, without
    re-executing it (a published chapter shows its run, recorded when it was published):

    - every cell gets the source cell's display tags (``DISPLAY_TAGS``: hide-input, ...), the
      cells matched by id, else by identical source text;
    - a markdown cell takes the source's text if the executed code is the source's (every code
      cell, parameters cells aside, has its source's text) and every ``{glue}`` name the new
      text cites was glued by the executed notebook; otherwise the executed prose stays, as it
      describes the outputs it was executed with.

    Returns notes on what stayed behind (for the assemble log)."""
    by_id = {c.get("id"): c for c in source["cells"] if c.get("id")}
    by_text = {(c["cell_type"], _text(c)): c for c in source["cells"]}

    def match(cell):
        s = by_id.get(cell.get("id"))
        if s is not None and s["cell_type"] == cell["cell_type"]:
            return s
        return by_text.get((cell["cell_type"], _text(cell)))

    def is_params(cell):
        return {"parameters", "injected-parameters"} & set(cell.get("metadata", {})
                                                            .get("tags", []))

    same_code = all(match(c) is not None and _text(match(c)) == _text(c)
                    for c in nb["cells"] if c["cell_type"] == "code" and not is_params(c))
    glued = glued_names(nb)
    notes = []
    for cell in nb["cells"]:
        s = match(cell)
        if s is None:
            continue
        tags = [t for t in cell.setdefault("metadata", {}).get("tags", [])
                if t not in DISPLAY_TAGS]
        cell["metadata"]["tags"] = tags + [t for t in s.get("metadata", {}).get("tags", [])
                                           if t in DISPLAY_TAGS]
        if cell["cell_type"] != "markdown" or _text(s) == _text(cell):
            continue
        missing = set(GLUE_REF.findall(_text(s))) - glued
        if same_code and not missing:
            cell["source"] = s["source"]
        else:
            notes.append(f"markdown cell {cell.get('id')} keeps its executed text ("
                         + ("the code changed since" if not same_code else
                            f"not glued: {', '.join(sorted(missing))}") + ")")
    return notes


def _text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _check_notebook(nb_path: Path) -> None:
    nb = json.loads(nb_path.read_text())
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise PublishError(f"{nb_path}: a cell raised {out.get('ename')}: "
                                   f"{out.get('evalue')}")


def publish(chapter: str, preset: str, overrides: dict | None = None, *,
            root: Path | None = None, allow_smoke: bool = False, kernel: str = "python3",
            progress: bool = True, log=print) -> dict:
    """Publish ``chapter`` at ``preset``; returns the publication record."""
    from repro.cli import validate_notebook
    from repro.params import PRESET
    # ``...`` means "the preset's value": no override (papermill would inject "Ellipsis")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not PRESET}
    if preset == "smoke" and not allow_smoke:
        raise PublishError("smoke runs prove only that the code runs: publish laptop, gpu "
                           "or paper results")
    config = validate_notebook(chapter, preset, overrides)
    module = experiments.get(chapter)

    t0 = time.time()
    kwargs = dict(overrides)
    if "progress" in inspect.signature(module.run).parameters:
        kwargs["progress"] = progress
    result = module.run(preset, **kwargs)
    experiment_s = time.time() - t0
    missing = [n for n, r in result.get("runs", {}).items() if "path" not in r]
    if not result.get("runs") or missing:
        raise PublishError(f"{chapter}.run() must return runs[name]['path'] for every run "
                           f"(the folders to publish); missing for: {missing or 'all'}")

    dest = published_dir(chapter, root)
    stage = dest.parent / f".{chapter}.staging"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "results").mkdir(parents=True)
    try:
        import papermill
        nb_out = stage / f"{chapter}.ipynb"
        t1 = time.time()
        log(f"[publish] executing notebooks/{chapter}.ipynb at preset {preset} ...")
        papermill.execute_notebook(str(experiments.notebook_path(chapter)), str(nb_out),
                                   parameters={"preset": preset, **overrides},
                                   kernel_name=kernel, progress_bar=False,
                                   cwd=str(experiments.NOTEBOOKS))
        notebook_s = time.time() - t1
        _relativise_outputs(nb_out)
        _check_notebook(nb_out)

        runs = {}
        for name, r in result["runs"].items():
            src = Path(r["path"])
            copy_run(src, stage / "results" / src.name)
            prov = r.get("provenance") or json.loads((src / "provenance.json").read_text())
            runs[name] = {"folder": f"results/{src.name}", "device": prov.get("device"),
                          "commit": prov.get("commit"), "date": prov.get("date"),
                          "wall_time_s": prov.get("wall_time_s"), "torch": prov.get("torch"),
                          "repro_version": prov.get("repro_version"),
                          "upstream_wall_time_s": _upstream_wall_time(src)}
        files = {str(p.relative_to(stage)): p.stat().st_size
                 for p in sorted(stage.rglob("*")) if p.is_file()}
        kept = keep_other_runs(dest / "results", stage / "results", preset,
                               partial=bool(overrides), used_before=_used_by(dest, preset))
        if any(f.endswith(".pt") for f in files):
            raise PublishError("a checkpoint slipped into the publication")
        total = sum(files.values())
        if total > MAX_BYTES:
            raise PublishError(f"publication of {chapter} is {total / 1e6:.2f} MB "
                               f"(> {MAX_BYTES / 1e6:.0f} MB): store fewer or smaller arrays")
        record = {
            "chapter": chapter, "preset": preset, "overrides": overrides,
            "config": config, "seed": run_seeds(config),
            "devices": sorted({r["device"] for r in runs.values() if r["device"]}),
            "commits": sorted({str(r["commit"]) for r in runs.values()}),
            "library_commit_at_publish": results.git_commit(),
            "computed": min((r["date"] for r in runs.values() if r["date"]), default=None),
            "published": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **results.compute_time(runs.values()),
            "publish_experiment_s": round(experiment_s, 1),
            "notebook_execution_s": round(notebook_s, 1),
            "notebook": f"{chapter}.ipynb", "runs": runs, "kept_runs": kept,
            "summary": result.get("summary"), "files": files, "total_bytes": total,
        }
        results._write_json(stage / RECORD, record)
        # Swap in atomically-enough: the old publication stays until the new one is complete.
        old = dest.parent / f".{chapter}.old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(stage, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"[publish] {chapter} [{preset}] -> {dest} ({total / 1e3:.0f} kB, "
        f"{len(files)} files; compute {record['compute_wall_time_s'] / 60:.1f} min, "
        f"notebook {notebook_s:.0f}s)")
    return record


def _upstream_wall_time(run_folder: Path) -> float | None:
    """Seconds of unpublished inputs a run was derived from, as its metrics record them
    (``upstream_wall_time_s``: BAT's memorization estimate and its subset models)."""
    f = run_folder / "metrics.json"
    if not f.exists():
        return None
    return json.loads(f.read_text()).get("upstream_wall_time_s")



def run_seeds(config: dict):
    """The seed(s) a publication's runs were trained at: AdvProp's list of ``seeds`` plus
    its ``extra_seeds`` (overnight: [0, 1, 2], the last for vanilla and AdvProp only); a
    chapter's ``seed`` plus its ``extra_seeds`` (HE at overnight: [0, 1]); else one int."""
    if "seeds" in config:
        seeds = list(config["seeds"])
        return seeds + [s for s in config.get("extra_seeds") or [] if s not in seeds]
    extra = [s for s in config.get("extra_seeds") or [] if s != config.get("seed")]
    return [config.get("seed"), *extra] if extra else config.get("seed")

def record(chapter: str, root: Path | None = None) -> dict | None:
    f = published_dir(chapter, root) / RECORD
    return json.loads(f.read_text()) if f.exists() else None


def load(chapter: str, root: Path | None = None) -> tuple[dict, dict] | None:
    """``(publication record, result dict)`` rebuilt from the published folder, or None.

    The result dict has the shape ``run()`` returns (config, runs[name] with metrics, arrays,
    provenance, path), read from the published run folders only."""
    rec = record(chapter, root)
    if rec is None:
        return None
    base = published_dir(chapter, root)
    runs = {}
    for name, info in rec["runs"].items():
        run = results.Run(base / info["folder"], {})
        runs[name] = {"metrics": run.metrics(), "arrays": run.arrays(),
                      "provenance": run.provenance(), "path": str(run.path)}
    return rec, {"config": rec["config"], "runs": runs, "summary": rec.get("summary")}


def main(args) -> int:
    """``python -m repro publish`` (wired in repro/cli.py)."""
    from repro import params
    overrides = {n: params.parse_cli_value(v) for n, v in (args.parameter or [])}
    try:
        publish(args.chapter, args.preset, overrides, allow_smoke=args.allow_smoke,
                kernel=args.kernel)
    except (params.ParameterError, PublishError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0



def assemble(smoke_dir: Path, out_dir: Path, chapters=None, log=print) -> dict[str, Path]:
    """Put every chapter's notebook where the book renders it: the published execution
    (``book/published/<c>/<c>.ipynb``) where there is one, else the smoke execution, with the
    source notebook's display tags and prose and the chapter's verdict box
    (``prepare_for_book``)."""
    chosen = {}
    for c in chapters or experiments.CHAPTERS:
        published = published_dir(c) / f"{c}.ipynb"
        src = published if published.exists() else Path(smoke_dir) / f"{c}.ipynb"
        if not src.exists():
            raise PublishError(f"no notebook for chapter {c}: neither {published} nor {src}")
        log(f"{Path(out_dir) / f'{c}.ipynb'} <- {src}")
        prepare_for_book(src, Path(out_dir) / f"{c}.ipynb",
                         source=experiments.notebook_path(c), chapter=c, log=log)
        chosen[c] = src
    return chosen


if __name__ == "__main__":
    # python -m repro.publish assemble SMOKE_DIR OUT_DIR   (what `make assemble` runs)
    if len(sys.argv) == 4 and sys.argv[1] == "assemble":
        assemble(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    print("usage: python -m repro.publish assemble SMOKE_DIR OUT_DIR\n"
          "(to publish a chapter: python -m repro publish CHAPTER --preset P)", file=sys.stderr)
    sys.exit(2)
