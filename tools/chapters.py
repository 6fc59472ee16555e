"""Print the book's chapters, in order, from ``CHAPTERS`` in repro/experiments/__init__.py.

Reads the dict literal with ``ast`` instead of importing the package, so the Makefile gets the
list instantly and without the virtual environment (tests/test_book.py checks it agrees with
``repro.experiments.CHAPTERS``)."""
import ast
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "repro" / "experiments" / "__init__.py"


def chapters(source: Path = SOURCE) -> list[str]:
    for node in ast.parse(source.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "CHAPTERS" for t in targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"no CHAPTERS literal in {source}")


if __name__ == "__main__":
    print(*chapters())
    sys.exit(0)
