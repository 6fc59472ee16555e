"""Command line: ``python -m repro {run,experiment,params,data,bench,publish,campaign} ...``.

    python -m repro run lmt --preset laptop -p epochs 5      # validate, then papermill
    python -m repro experiment lmt --preset gpu              # same results, no Jupyter
    python -m repro params lmt                               # list parameters and presets
    python -m repro data prepare                             # offline data -> .data/
    python -m repro bench pgd --device cuda                  # speed benchmarks
    python -m repro publish intro --preset laptop            # notebook + results -> book/published/
    python -m repro campaign plan                            # the GPU campaign's pieces
    torchrun --nproc_per_node=4 -m repro experiment he --preset paper   # data-parallel
    python -m repro memorization train --preset gpu --shard 0/8          # BAT's subset models

An error (a bad parameter, a missing dataset, a corrupt checkpoint, a failed notebook cell)
prints ``error: ...`` and exits non-zero (2 for parameters, 1 otherwise) without a Python
traceback; ``--debug`` (anywhere on the line, before NAME for ``bench``) shows it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

from repro import experiments, params


def _overrides(pairs) -> dict:
    """``-p NAME VALUE`` pairs as values; ``...`` means "the preset's value", like no ``-p``."""
    values = {name: params.parse_cli_value(value) for name, value in (pairs or [])}
    return {name: v for name, v in values.items() if v is not params.PRESET}


def _add_chapter_args(p):
    p.add_argument("chapter", help=f"one of: {', '.join(experiments.CHAPTERS)}")
    p.add_argument("--preset", default="smoke", help=", ".join(params.PRESETS))
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override one parameter (repeatable)")


def validate_notebook(chapter: str, preset: str, overrides: dict) -> dict:
    """Check the overrides against the chapter's spec and the notebook's declared parameters
    before anything executes; returns the resolved config."""
    spec = experiments.get(chapter).SPEC
    config = spec.resolve(preset, **overrides)
    nb = experiments.notebook_path(chapter)
    import papermill
    declared = set(papermill.inspect_notebook(str(nb)))
    expected = {"preset", *spec.by_name}
    if declared != expected:
        raise params.ParameterError(
            f"{nb} declares parameters {sorted(declared)} but the chapter spec has "
            f"{sorted(expected)}: the notebook and repro/experiments/{chapter}.py disagree")
    return config


def cmd_run(args) -> int:
    overrides = _overrides(args.parameter)
    try:
        validate_notebook(args.chapter, args.preset, overrides)
    except params.ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import papermill
    out = Path(args.output or f"_build/executed/{args.chapter}-{args.preset}.ipynb")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    papermill.execute_notebook(str(experiments.notebook_path(args.chapter)), str(out),
                               parameters={"preset": args.preset, **overrides},
                               kernel_name=args.kernel, progress_bar=False,
                               cwd=str(experiments.NOTEBOOKS))
    print(f"{args.chapter} [{args.preset}] executed in {time.time() - start:.1f}s -> {out}")
    return 0


def cmd_experiment(args) -> int:
    from repro import distributed
    module = experiments.get(args.chapter)
    try:
        module.SPEC.resolve(args.preset, **_overrides(args.parameter))
    except params.ParameterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.init_from_env()  # under torchrun: data-parallel training, rank 0 writes
    try:
        start = time.time()
        # progress bars from rank 0 only (the others evaluate the same models alike)
        kw = {} if distributed.is_writer() else {"progress": False}
        result = module.run(args.preset, **kw, **_overrides(args.parameter))
        summary = result.get("summary", {}) if isinstance(result, dict) else {}
        if distributed.is_writer():
            print(json.dumps(summary, indent=2, default=str))
            print(f"{args.chapter} [{args.preset}] finished in {time.time() - start:.1f}s"
                  + (f" on {distributed.world_size()} processes"
                     if distributed.world_size() > 1 else ""))
    finally:
        distributed.shutdown()
    return 0


def cmd_memorization(args) -> int:
    """BAT's memorization estimate as independent shards: ``train --shard i/N`` records
    models i, i+N, ... of the K subset models; ``status`` lists the missing ones; ``merge``
    computes the estimates once all K are recorded (it also trains the one proxy run)."""
    from repro import memorization
    from repro.experiments import bat, common
    overrides = _overrides(args.parameter)
    try:
        cfg = bat.SPEC.resolve(args.preset, **overrides)
        shard = memorization.parse_shard(args.shard) if args.action == "train" else None
    except (params.ParameterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.action == "train" and shard is None:
        print("error: memorization train needs --shard i/N (e.g. --shard 0/1 for all)",
              file=sys.stderr)
        return 2
    names = [cfg["dataset"]] + ([cfg["contrast"]] if cfg["contrast"] not in
                                ("none", cfg["dataset"]) else [])
    if args.data != "all":
        names = [names[0]] if args.data == "main" else names[1:]
    device = common.pick_device(cfg["device"])
    missing = 0
    for name in names:
        ds = common.load_dataset(name, n_train=cfg["n_train"], n_test=cfg["n_test"],
                                 n_val=cfg["n_val"])
        if args.action == "train":
            st = bat.train_subset_shard(cfg, ds, device, shard, progress=not args.quiet)
        elif args.action == "status":
            st = bat.subset_status(cfg, ds)
        else:
            st = bat.subset_status(cfg, ds)
            if not st["missing"]:
                run = bat.memorization_run(cfg, ds, device, progress=not args.quiet,
                                           with_proxy=name == cfg["dataset"], train_missing=False)
                st["estimate"] = run.metrics()["estimate"]
                st["memorization_run"] = str(run.path)
        missing += len(st["missing"])
        shown = st["missing"][:20] + (["..."] if len(st["missing"]) > 20 else [])
        print(f"[memorization] {name}: {st['done']}/{st['k']} subset models recorded in "
              f"{st['folder']}/models" + (f"; missing {shown}" if st["missing"] else ""))
        if "estimate" in st:
            print(f"[memorization] {name}: estimate -> {st['memorization_run']}\n"
                  + json.dumps(st["estimate"], indent=1))
    if args.action == "merge" and missing:
        print(f"error: {missing} subset models missing; run their shards (or copy their "
              f"model_*.npz into the folders above) and merge again", file=sys.stderr)
        return 1
    return 0


def cmd_params(args) -> int:
    spec = experiments.get(args.chapter).SPEC
    print(f"parameters of {args.chapter}:\n  {spec.describe()}\n")
    for preset, values in spec.presets.items():
        print(f"{preset}: {json.dumps(values)}")
    return 0


def cmd_data(args) -> int:
    from repro import data
    if args.action == "prepare":
        root = data.prepare_offline(args.root, args.names or data.NAMES)
        print(f"data ready in {root}")
    else:
        for name in args.names or data.NAMES:
            print(data.load(name, args.root))
    return 0


def benchmarks() -> list[str]:
    import repro.benchmarks as b
    return sorted(m.name for m in pkgutil.iter_modules(b.__path__) if not m.name.startswith("_"))


def cmd_bench(args, rest) -> int:
    if args.name is None or args.name.startswith("-"):
        print("usage: python -m repro bench NAME [benchmark arguments]; NAME is one of: "
              + ", ".join(benchmarks()) + " (python -m repro bench NAME --help for its options)")
        return 0 if [args.name, *rest] in ([None], [None, "-h"], [None, "--help"]) else 2
    if args.name not in benchmarks():
        print(f"error: unknown benchmark {args.name!r}; have: {', '.join(benchmarks())}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"repro.benchmarks.{args.name}").main(rest) or 0


def _error_message(e: BaseException) -> str:
    """What the user needs from an error, without the traceback."""
    if isinstance(e, params.ParameterError):
        return str(e)
    if type(e).__name__ == "PapermillExecutionError":  # its str() holds the cell's traceback
        return (f"the notebook failed in cell {getattr(e, 'exec_count', '?')}: "
                f"{getattr(e, 'ename', '?')}: {getattr(e, 'evalue', '')}")
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError quotes it
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv=None) -> int:
    """Run the command line; errors become ``error: ...`` and a non-zero exit code (no
    traceback unless ``--debug``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    bench = argv[command_at:command_at + 1] == ["bench"]  # its later arguments are its own
    debug = "--debug" in (argv[:command_at] if bench else argv)
    if debug:
        argv.remove("--debug")
    try:
        return _main(argv)
    except Exception as e:
        if debug:
            raise
        print(f"error: {_error_message(e)} [--debug shows the traceback]", file=sys.stderr)
        return 2 if isinstance(e, params.ParameterError) else 1


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="validate parameters, then execute a chapter notebook")
    _add_chapter_args(p)
    p.add_argument("--output", help="executed notebook path (default _build/executed/...)")
    p.add_argument("--kernel", default="python3")
    p = sub.add_parser("experiment", help="compute a chapter's results without Jupyter")
    _add_chapter_args(p)
    p = sub.add_parser("publish", help="run, execute and publish a chapter into book/published/")
    _add_chapter_args(p)
    p.add_argument("--kernel", default="python3")
    p.add_argument("--allow-smoke", action="store_true", help="publish a smoke run (tests only)")
    p = sub.add_parser("memorization", help="BAT's subset models as shards: train --shard "
                       "i/N, status, merge")
    p.add_argument("action", choices=["train", "status", "merge"])
    p.add_argument("--preset", default="smoke", help="BAT's preset (smoke, laptop, gpu, paper)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="override one BAT parameter (repeatable)")
    p.add_argument("--shard", help="i/N: train models i, i+N, i+2N, ... of the K (train only)")
    p.add_argument("--data", choices=["all", "main", "contrast"], default="all",
                   help="which dataset's estimate (default: the main one and the contrast)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p = sub.add_parser("params", help="list a chapter's parameters and presets")
    p.add_argument("chapter")
    p = sub.add_parser("data", help="prepare or list datasets")
    p.add_argument("action", choices=["prepare", "show"])
    p.add_argument("names", nargs="*")
    p.add_argument("--root", default=None)
    # no -h of its own: `bench NAME --help` reaches the benchmark's parser
    p = sub.add_parser("bench", add_help=False,
                       help="speed benchmarks (extra arguments, --help included, go to the "
                            "benchmark)")
    p.add_argument("name", nargs="?")
    sub.add_parser("campaign", add_help=False,
                   help="the GPU campaign: plan, run (on the GPU), ingest (extra arguments, "
                        "--help included, go to repro.campaign)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if args.command == "campaign":
        from repro import campaign
        return campaign.main(rest) or 0
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "publish":
        from repro import publish
        return publish.main(args)
    return {"run": cmd_run, "experiment": cmd_experiment, "params": cmd_params,
            "data": cmd_data, "memorization": cmd_memorization}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
