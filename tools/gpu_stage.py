#!/usr/bin/env python3
"""Stage what a GPU campaign window needs into ``.device/p1``, ``.device/p2``, ... (git-ignored),
each part small enough to travel with the working tree in one device call (64 MiB a call).

    python3 tools/gpu_stage.py mnist cifar10        # the datasets the next pieces need

Writes, from the root of the checkout the device tool sends:

* ``.device/pN/<dataset>/...``: the offline shards of ``../shared/data``, spread over as few
  parts as fit (largest first, each into the emptiest part);
* in the last part: ``pyautoattack/*.py`` (AutoAttack's Python files only: its wheel holds a
  44 MB example model), ``prepare.py``, ``stamp.json`` (the commit and library digest that
  ``campaign ingest`` checks the results against) and ``unpack.sh`` (on the device: gathers
  the shards and writes ``.data/<name>.npz``);

and prints the ``carry`` of each call. Send the parts in order, one call each, back to back
(the machine stays warm 30 s after a call); the last call unpacks and runs the campaign.
``tools/gpu-window.md`` has the whole sequence. Standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CALL_LIMIT = 64 * 1024 * 1024          # the device tool's limit per call, tree included
MARGIN = 2 * 1024 * 1024


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def library_digest(root: Path) -> str:
    """The same digest as ``repro.campaign.library_digest`` (kept in step by a test)."""
    base = root / "repro"
    h = hashlib.sha256()
    for f in sorted(base.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def find_autoattack(root: Path) -> Path:
    env = os.environ.get("AUTOATTACK_DIR")
    if env:
        return Path(env)
    for py in (sys.executable, str(root / ".venv" / "bin" / "python")):
        if not Path(py).exists():
            continue
        out = subprocess.run([py, "-c", "import pyautoattack, os; "
                              "print(os.path.dirname(pyautoattack.__file__))"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            return Path(out.stdout.strip())
    raise SystemExit("pyautoattack not found: set AUTOATTACK_DIR to its package folder")


def plan_parts(files: list[tuple[Path, str]], capacity: int) -> list[list[tuple[Path, str]]]:
    """Fewest parts of at most ``capacity`` bytes: largest file first into the emptiest."""
    n = 1
    while True:
        parts: list[list] = [[] for _ in range(n)]
        used = [0] * n
        for f, dest in sorted(files, key=lambda t: -t[0].stat().st_size):
            i = used.index(min(used))
            parts[i].append((f, dest))
            used[i] += f.stat().st_size
        if max(used) <= capacity:
            return parts
        n += 1


def main(argv=None) -> int:
    names = list(argv if argv is not None else sys.argv[1:])
    if not names or any(n.startswith("-") for n in names):
        print(__doc__)
        return 2
    root = Path(git("rev-parse", "--show-toplevel"))
    shared = Path(os.environ.get("SHARED_DATA", root.parent / "shared" / "data"))
    if not shared.is_dir():
        shared = Path("/work/shared/data")
    files = []
    for name in names:
        if not (shared / name / "meta.json").exists():
            raise SystemExit(f"no dataset {name} in {shared}")
        files += [(f, f"{name}/{f.name}") for f in sorted((shared / name).iterdir())]
    tracked = git("-C", str(root), "ls-files", "-z").split("\0")
    tree = sum((root / f).stat().st_size for f in tracked if f and (root / f).is_file())
    aa = find_autoattack(root)
    extra = [(f, f"pyautoattack/{f.name}") for f in sorted(aa.glob("*.py"))]
    extra.append((shared / "prepare.py", "prepare.py"))
    extra_size = sum(f.stat().st_size for f, _ in extra)
    capacity = CALL_LIMIT - MARGIN - tree - extra_size
    parts = plan_parts(files, capacity)
    parts[-1] += extra

    if subprocess.run(["git", "-C", str(root), "check-ignore", "-q", ".device/x"]).returncode:
        raise SystemExit(".device/ is not git-ignored here (the project's .gitignore has it): "
                         "it would travel twice")
    dev = root / ".device"
    shutil.rmtree(dev, ignore_errors=True)
    for i, part in enumerate(parts, 1):
        for f, dest in part:
            (dev / f"p{i}" / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dev / f"p{i}" / dest)
    last = f".device/p{len(parts)}"
    dirty = git("-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "repro")
    stamp = {"commit": git("-C", str(root), "rev-parse", "--short=12", "HEAD")
             + ("+dirty" if dirty else ""), "library_digest": library_digest(root),
             "datasets": names, "source": "tools/gpu_stage.py"}
    (root / last / "stamp.json").write_text(json.dumps(stamp) + "\n")
    (root / last / "unpack.sh").write_text(
        "# on the device, from the checkout root: gather every part's shards, write .data/*.npz\n"
        "set -e\n"
        "# every part must be here: a machine that went cold between the calls lost part 1\n"
        f"for n in {' '.join(names)}; do for f in $(python3 -c \"import json,sys; "
        "m=json.load(open(sys.argv[1])); print(' '.join(s for v in m['splits'].values() "
        f"for s in v['shards']))\" $(ls -d .device/p*/$n | head -1)/meta.json); do\n"
        "  ls .device/p*/$n/$f >/dev/null 2>&1 || { echo \"missing $n/$f: the machine "
        "was restarted between the calls; send every part again\" >&2; exit 3; }\n"
        "done; done\n"
        "mkdir -p .data/src\n"
        f"for n in {' '.join(names)}; do\n"
        "  mkdir -p .data/src/$n\n"
        "  for d in .device/p*/; do [ -d \"$d$n\" ] && cp \"$d$n\"/* .data/src/$n/; done\n"
        "done\n"
        f"python3 {last}/prepare.py .data {' '.join(names)} --src .data/src\n"
        "rm -rf .data/src\nls -l .data/*.npz\n")
    print(f"staged {' '.join(names)} in {len(parts)} part(s) (tree {tree / 2**20:.1f} MiB "
          "travels with each call):")
    for i in range(1, len(parts) + 1):
        size = sum(f.stat().st_size for f in (dev / f"p{i}").rglob("*") if f.is_file())
        print(f"  call {i}: carry [\".device/p{i}\"]  ({size / 2**20:.1f} MiB + tree)")
    print(f"last call's command starts with: bash {last}/unpack.sh && "
          f"export PYTHONPATH={last}")
    print(f"stamp: {json.dumps(stamp)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
