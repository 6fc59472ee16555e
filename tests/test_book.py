"""The book's assembly: table of contents, chapter list, claims registry and scorecard, the
offline-site check, and the published chapters' size and provenance."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from repro import claims, experiments, publish, scorecard, verdicts

ROOT = experiments.PROJECT_ROOT
SITE = ROOT / "_build" / "html"


@pytest.fixture
def site():
    """The built book. `make test` runs before `make book`, so there the tests of the built
    site skip; `.ci/run` runs them again after `make book` with REPRO_BUILT_BOOK=1, where a
    missing site is a failure, not a skip (marker built_book)."""
    if not (SITE / "index.html").exists():
        if os.environ.get("REPRO_BUILT_BOOK") == "1":
            pytest.fail(f"REPRO_BUILT_BOOK=1 but {SITE / 'index.html'} does not exist")
        pytest.skip("book not built (make book)")
    return SITE
FOUR = ("he", "lmt", "advprop", "bat")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toc_files(node) -> list[str]:
    out = []
    if isinstance(node, dict):
        if "file" in node:
            out.append(node["file"])
        for v in node.values():
            out += _toc_files(v)
    elif isinstance(node, list):
        for v in node:
            out += _toc_files(v)
    return out


def test_toc_lists_every_chapter_and_the_book_pages():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = _toc_files(toc)
    for chapter in experiments.CHAPTERS:
        assert f"book/chapters/{chapter}" in files, f"add `- file: book/chapters/{chapter}`"
    assert "book/chapters/scorecard" in files and "book/how-to-run" in files


def test_makefile_takes_chapters_from_the_registry():
    assert _tool("chapters").chapters() == list(experiments.CHAPTERS)
    make = (ROOT / "Makefile").read_text()
    assert "tools/chapters.py" in make and "CHAPTERS := intro" not in make
    out = subprocess.run(["make", "-n", "smoke"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"for c in {' '.join(experiments.CHAPTERS)};" in out.stdout


def test_every_paper_has_claims_with_sources():
    ids = [c.id for cs in claims.all_claims().values() for c in cs]
    assert len(ids) == len(set(ids)), "claim ids are unique"
    for paper in FOUR:
        cs = claims.claims_for(paper)
        assert len(cs) >= 3, paper
        for c in cs:
            assert c.id.startswith(paper + ".") and c.text and c.paper_value and c.source
    # The paper numbers are there as their sources state them (tests/test_claims.py checks
    # the data files field by field).
    values = {c.id: c.paper_value for cs in claims.all_claims().values() for c in cs}
    assert values["he.rb-clean"] == "85.14" and values["he.rb-aa"] == "53.74"
    assert values["advprop.clean-gain-b7"] == "84.5 → 85.2 (+0.7)"


def test_chapter_claims_override_the_registry(monkeypatch):
    import dataclasses
    import types
    fake = types.ModuleType("fake_he")
    judged = dataclasses.replace(claims.get("he.aa-gain"),
                                 evaluate=lambda r: claims.Outcome("+1.0 points",
                                                                   claims.PARTLY, 1.0))
    extra = claims.Claim("he.new", "he", "a new claim", "qualitative", source="here")
    fake.CLAIMS = [judged, extra]
    monkeypatch.setattr(claims, "chapter_module", lambda p: fake if p == "he" else None)
    cs = {c.id: c for c in claims.claims_for("he")}
    assert cs["he.aa-gain"].evaluate is not None and "he.new" in cs
    assert len(cs) == len(claims.PAPER_CLAIMS["he"]) + 1
    assert cs["he.aa-gain"].judge(None).verdict == claims.NOT_YET_RUN
    assert cs["he.aa-gain"].judge({"runs": {}}).verdict == claims.PARTLY
    assert cs["he.rb-clean"].judge({"runs": {}}).verdict == claims.NOT_YET_RUN


def _intro_result(std_clean, std_pgd, adv_clean, adv_pgd, aa=None, flags=0, n=2000):
    """A result in intro.run()'s shape: per-example correctness with the given accuracies
    (the first k of n images correct, so the models' errors overlap)."""
    def ok(p):
        return np.arange(n) < round(p * n)
    checks = [{"name": f"c{i}", "passed": i >= flags, "message": ""} for i in range(5)]
    adv = {"metrics": {"accuracy": {"clean": adv_clean, "pgd40": adv_pgd},
                       "sanity": {"checks": checks}},
           "arrays": {"correct_clean": ok(adv_clean), "correct_pgd40": ok(adv_pgd)}}
    if aa is not None:
        adv["metrics"]["autoattack"] = {"version": "fast", "accuracy": aa}
        adv["arrays"]["correct_autoattack"] = ok(aa)
    std = {"metrics": {"accuracy": {"clean": std_clean, "pgd40": std_pgd}},
           "arrays": {"correct_clean": ok(std_clean), "correct_pgd40": ok(std_pgd)}}
    return {"config": {"eval_steps": 40}, "runs": {"standard": std, "pgd_at": adv}}


def test_intro_claims_judge_a_result():
    good = _intro_result(0.99, 0.05, 0.98, 0.90, aa=0.895)
    verdicts = {c.id: c.judge(good).verdict for c in claims.claims_for("intro")}
    assert set(verdicts.values()) == {claims.REPRODUCED}
    bad = _intro_result(0.99, 0.95, 0.98, 0.90, aa=0.70, flags=3)
    verdicts = {c.id: c.judge(bad).verdict for c in claims.claims_for("intro")}
    assert verdicts["intro.standard-fragile"] == claims.NOT_REPRODUCED
    assert verdicts["intro.at-raises-pgd"] == claims.NOT_REPRODUCED
    assert verdicts["intro.aa-confirms-pgd"] == claims.NOT_REPRODUCED
    assert verdicts["intro.no-masking"] == claims.NOT_REPRODUCED
    # the same numbers on 200 test images are below the floor: nothing is refuted
    small = _intro_result(0.99, 0.95, 0.98, 0.90, aa=0.70, flags=3, n=200)
    assert {c.judge(small).verdict for c in claims.claims_for("intro")} == {
        claims.INCONCLUSIVE}
    no_aa = _intro_result(0.99, 0.05, 0.98, 0.90)
    assert claims.get("intro.aa-confirms-pgd").judge(no_aa).verdict == claims.NOT_YET_RUN


def test_scorecard_lists_every_claim(tmp_path):
    empty = tmp_path / "published"  # nothing published: every claim "not yet run"
    text = scorecard.markdown(empty)
    for paper, cs in claims.all_claims().items():
        assert f"## {claims.PAPERS[paper]['short']}" in text
        for c in cs:
            assert f"`{c.id}`" in text
    rows = scorecard.rows(empty)
    assert {r["verdict"] for r in rows} == {claims.NOT_YET_RUN}
    assert len(rows) == sum(len(cs) for cs in claims.all_claims().values())
    # one card per claim, under a label the chapters' verdict boxes link to; no wide tables
    for r in rows:
        assert f"({scorecard.anchor(r['id'])})=\n::::{{card}}" in text
    assert max(line.count(" | ") for line in text.splitlines()) <= 2


def _md(text, id_, tags=()):
    return {"cell_type": "markdown", "id": id_, "metadata": {"tags": list(tags)},
            "source": text}


def _code(text, id_, tags=(), glued=()):
    outs = [{"output_type": "display_data", "data": {"application/papermill.record/text/plain":
             "1"}, "metadata": {"scrapbook": {"name": g, "mime_prefix": "x"}}} for g in glued]
    return {"cell_type": "code", "id": id_, "metadata": {"tags": list(tags)},
            "outputs": outs, "source": text, "execution_count": None}


def test_verdict_box_comes_from_the_scorecard_rows_and_replaces_the_marker(tmp_path):
    empty = tmp_path / "published"
    box = verdicts.box("he", empty)
    rows = verdicts.chapter_rows("he", empty)
    assert rows and [r["paper"] for r in rows] == ["he"] * len(rows)
    for r in rows:  # a badge and a link to the claim's scorecard card, per claim
        assert f"{scorecard.badge(r['verdict'])} {{ref}}`" in box
        assert f"<{scorecard.anchor(r['id'])}>`" in box
    assert box.startswith(":::{admonition}") and f":class: {verdicts.BOX_CLASS}" in box
    assert "smoke" in box  # nothing published: the sentence on the scale says so
    nb = {"cells": [_md(f"# Title\n\n{verdicts.MARKER}\n\nmore", "a"), _code("x = 1", "b")]}
    verdicts.insert_box(nb, "he", empty)
    assert verdicts.MARKER not in nb["cells"][0]["source"] and box in nb["cells"][0]["source"]
    nb = {"cells": [_md("# Title", "a"), _code("x = 1", "b")]}  # no marker: after the intro
    verdicts.insert_box(nb, "he", empty)
    assert nb["cells"][1]["source"] == box and nb["cells"][2]["id"] == "b"


def test_the_run_sentence_names_every_seed_the_verdicts_pair_over():
    """HE's overnight runs are trained at seed 0 and at its extra seed 1, and the gain claims
    pair over both: the box and the scorecard name both, not the config's first seed."""
    assert publish.run_seeds({"seed": 0, "extra_seeds": [1]}) == [0, 1]
    assert publish.run_seeds({"seeds": [0, 1], "extra_seeds": [2, 1]}) == [0, 1, 2]
    assert publish.run_seeds({"seeds": [0, 1]}) == [0, 1]   # published before extra_seeds
    assert publish.run_seeds({"seed": 0, "extra_seeds": []}) == 0
    assert publish.run_seeds({"seed": 1, "extra_seeds": [1]}) == 1
    assert publish.run_seeds({"seeds": [0, 1, 2]}) == [0, 1, 2]   # AdvProp's list
    rec = {"preset": "overnight", "devices": ["cpu: AMD EPYC"], "seed": [0, 1],
           "compute_wall_time_s": 600}
    assert "(cpu, seeds 0, 1, 10 min of compute)" in verdicts.scale_sentence([], rec)
    assert scorecard.seed_words(3) == "seed 3" and scorecard.seed_words([2]) == "seed 2"


def test_precision_note_says_which_evaluations_ran_compiled():
    from repro import report

    def run(compiled):
        m = {"training": {"precision": {"amp": "bf16"}}}
        if compiled is not None:
            m["evaluation"] = {"compile": compiled}
        return {"metrics": m, "provenance": {"device": "cpu"}}
    eager = {"runs": {"a": run(None), "b": run(False)}}
    assert report.precision_note(eager).endswith("(evaluation is fp32).")
    mixed = {"runs": {"a": run(True), "b": run(False), "c": run(True)}}
    assert "bf16 (3 runs)" in report.precision_note(mixed)
    assert report.precision_note(mixed).endswith(
        "(evaluation is fp32, compiled with torch.compile in 2 of them).")


def test_sync_from_source_applies_tags_and_only_prose_the_outputs_back():
    executed = {"cells": [
        _md("old intro", "m0"),
        _code("preset = 'laptop'", "p", ["injected-parameters"]),
        _code("glue('a', 1)", "c1", ["hide-output"], glued=["a"]),
        _md("a is {glue:text}`a`", "m1"),
        _md("old text", "m2")]}
    source = {"cells": [
        _md("new intro", "m0"),
        _code("glue('a', 1)", "c1", ["hide-cell", "other"]),
        _md("a is {glue:text}`a:.1f` and b is {glue:text}`b`", "m1"),
        _md("new text", "m2")]}
    notes = publish.sync_from_source(executed, source)
    cells = {c["id"]: c for c in executed["cells"]}
    assert cells["c1"]["metadata"]["tags"] == ["hide-cell"]  # display tags only, replaced
    assert cells["p"]["metadata"]["tags"] == ["injected-parameters"]
    assert cells["m0"]["source"] == "new intro" and cells["m2"]["source"] == "new text"
    assert cells["m1"]["source"] == "a is {glue:text}`a`" and "b" in notes[0]  # b not glued
    # once the code differs from what was executed, the executed prose stays (the tags still
    # follow the cell by id)
    source["cells"][1]["source"] = "glue('a', 2)"
    executed["cells"][0]["source"] = "old intro"
    assert "code changed" in publish.sync_from_source(executed, source)[0]
    assert executed["cells"][0]["source"] == "old intro"
    assert executed["cells"][2]["metadata"]["tags"] == ["hide-cell"]


@pytest.mark.parametrize("chapter", list(experiments.CHAPTERS))
def test_chapter_source_puts_verdicts_first_and_folds_its_plumbing(chapter):
    nb = json.loads(experiments.notebook_path(chapter).read_text())
    cells = nb["cells"]
    first_code = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    intro = "".join("".join(c["source"]) for c in cells[:first_code])
    assert verdicts.MARKER in intro, "mark where the introduction ends: <!-- verdicts -->"
    for c in cells:
        tags = set(c.get("metadata", {}).get("tags", []))
        src = "".join(c["source"])
        if c["cell_type"] != "code":
            continue
        assert not tags & {"remove-input", "remove-cell"}, "fold code (hide-*), keep it"
        if re.search(r"^\s*glue\(", src, re.M):
            assert tags & {"hide-input", "hide-cell"}, f"glue cell shown: {src[:60]!r}"


def test_offline_check_flags_remote_assets(tmp_path):
    cs = _tool("check_site")
    html = ('<html><head><script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex.js">'
            '</script><link rel="stylesheet" href="//fonts.googleapis.com/css?family=X">'
            '<style>@font-face{src:url("https://x.org/f.woff")}</style>'
            '<script>const U = "https://unpkg.com/thebe/lib/index.js"</script></head>'
            '<body><a href="https://example.org">a link is fine</a>'
            '<img src="_images/local.png"></body></html>')
    found = [u for _, u in cs.remote_assets_in_html(html)]
    assert found == ["https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex.js",
                     "//fonts.googleapis.com/css?family=X", "https://x.org/f.woff",
                     "https://unpkg.com/thebe/lib/index.js"]
    assert cs.remote_assets_in_css("a{background:url(../img/x.png)}") == []
    assert cs.remote_assets_in_css("@import 'https://fonts.x/y.css';") == ["https://fonts.x/y.css"]
    (tmp_path / "index.html").write_text(html)
    assert len(cs.check(tmp_path)) >= 4


@pytest.mark.built_book
def test_built_site_loads_nothing_from_the_network(site):
    assert _tool("check_site").check(site) == []


@pytest.mark.parametrize("chapter", [c for c in experiments.CHAPTERS
                                     if publish.record(c) is not None])
def test_published_chapter_is_small_complete_and_provenanced(chapter):
    rec = publish.record(chapter)
    base = publish.published_dir(chapter)
    files = [p for p in base.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".pt"], "no checkpoints in the book"
    assert sum(p.stat().st_size for p in files) < publish.MAX_BYTES
    assert rec["preset"] in ("laptop", "gpu", "paper")
    for key in ("devices", "commits", "seed", "computed", "published", "compute_wall_time_s"):
        assert rec[key] not in (None, [], ""), key
    for name, run in rec["runs"].items():
        for f in ("config.json", "metrics.json", "provenance.json", "DONE"):
            assert (base / run["folder"] / f).is_file(), (name, f)
    nb = json.loads((base / rec["notebook"]).read_text())
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert str(ROOT) not in json.dumps(nb), "no absolute paths of the publishing machine"
    # The scorecard judges this chapter's claims from the published files alone.
    loaded_rec, result = publish.load(chapter)
    assert set(result["runs"]) == set(rec["runs"])


# A pipe table's delimiter row (|---|---|). myst-nb renders a cell's text/markdown output as
# CommonMark, which has no tables, and text/plain or a stream as text: either way such a row
# reaches the reader as raw pipes.
PIPE_TABLE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$", re.M)


def unrendered_tables(nb: dict) -> list[str]:
    """Outputs of a notebook that show a markdown table as text: 'cell N: mime'."""
    hits = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            texts = {"stream": out.get("text", "")} if out.get("output_type") == "stream" else \
                {m: out.get("data", {}).get(m, "") for m in ("text/markdown", "text/plain")}
            for mime, text in texts.items():
                if PIPE_TABLE.search("".join(text) if isinstance(text, list) else text):
                    hits.append(f"cell {i}: {mime}")
    return hits


def _visible_text(html: str) -> str:
    """The text of an HTML page outside code, scripts and styles."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        skip, parts = 0, []

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("pre", "code", "script", "style")

        def handle_endtag(self, tag):
            self.skip -= tag in ("pre", "code", "script", "style") and self.skip > 0

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)
    t = Text()
    t.parts = []
    t.feed(html)
    return "".join(t.parts)


def test_the_table_check_tells_raw_pipes_from_a_rendered_table():
    raw = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "display_data", "data": {
        "text/markdown": "**gain**\n\n| method | gain |\n|---|---|\n| PGD-AT | +1.0 |"}}]}]}
    assert unrendered_tables(raw) == ["cell 0: text/markdown"]
    html_table = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "execute_result",
                  "data": {"text/html": "<table><tr><td>1</td></tr></table>",
                           "text/plain": "   method  gain\n0  PGD-AT   1.0"}}]}]}
    assert unrendered_tables(html_table) == []
    assert PIPE_TABLE.search(_visible_text("<p>| a | b |\n|---|---|</p>"))
    assert not PIPE_TABLE.search(_visible_text("<pre>| a | b |\n|---|---|</pre><table></table>"))


@pytest.mark.parametrize("chapter", [c for c in experiments.CHAPTERS
                                     if publish.record(c) is not None])
def test_no_published_page_shows_an_unrendered_markdown_table(chapter):
    nb = json.loads((publish.published_dir(chapter) / f"{chapter}.ipynb").read_text())
    assert unrendered_tables(nb) == [], "render tables as DataFrames, not markdown strings"


@pytest.mark.built_book
def test_no_built_page_shows_an_unrendered_markdown_table(site):
    bad = [str(p.relative_to(site)) for p in site.rglob("*.html")
           if "_static" not in p.parts and "_sources" not in p.parts
           and PIPE_TABLE.search(_visible_text(p.read_text(errors="replace")))]
    assert bad == []


def test_published_tree_stays_small():
    root = ROOT / "book" / "published"
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
    assert total < 2_000_000 * max(1, len(experiments.CHAPTERS))


def test_how_to_run_page_names_the_commands():
    text = (ROOT / "book" / "how-to-run.md").read_text()
    for cmd in ("python -m repro run", "papermill notebooks/", "python -m repro experiment",
                "python -m repro publish", "make browser-test", "book/published/"):
        assert cmd in text


def test_ci_runs_the_browser_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make browser-test" in ci and "chromium-driver" in ci
    assert ci.index("make book") < ci.index("make browser-test")


def test_ci_checks_the_built_book_after_building_it():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make check-built-book" in ci
    assert ci.index("make book") < ci.index("make check-built-book")
    make = (ROOT / "Makefile").read_text()
    assert "REPRO_BUILT_BOOK=1" in make and "-m built_book" in make


def test_browser_test_flags_what_a_reader_trips_over():
    bt = _tool("browser_test")
    ok = {"width": 390, "pageWidth": 390, "scrolling": [], "glueCells": [], "codeCells": 3,
          "verdicts": {"badges": 2, "items": 2, "links": 2, "beforeFirstCode": True}}
    assert bt.layout_problems(ok, chapter=True) == []
    bad = {**ok, "pageWidth": 498, "scrolling": ["table in a 900-px box 358 px wide (scrolls)"],
           "glueCells": ["glue('x', 1)"],
           "verdicts": {"badges": 2, "items": 2, "links": 1, "beforeFirstCode": False}}
    assert len(bt.layout_problems(bad, chapter=True)) == 5
    assert len(bt.layout_problems(bad, chapter=False)) == 2  # verdicts and glue: chapters only
    assert bt.layout_problems({**ok, "verdicts": None}, chapter=True) == [
        "no verdict box (.admonition.verdicts)"]
    assert set(bt.SCREENS) == {1280, 390}
    assert bt.chapter_pages() == {f"book/chapters/{c}.html" for c in experiments.CHAPTERS}


@pytest.mark.built_book
def test_built_chapters_show_their_verdicts_before_any_code(site):
    for chapter in experiments.CHAPTERS:
        html = (site / "book" / "chapters" / f"{chapter}.html").read_text()
        m = re.search(rf'class="[^"]*\b{verdicts.BOX_CLASS}\b[^"]*"', html)
        box = m.start() if m else -1
        assert 0 <= box < html.find('class="cell'), chapter
        assert "scorecard.html#claim-" in html[box:html.find('class="cell')]


def test_browser_test_finds_raw_math():
    bt = _tool("browser_test")
    assert bt.RAW_MATH.findall("the radius $\\epsilon$ was") == ["$\\epsilon$"]
    assert bt.RAW_MATH.findall("costs $5 and $10 today") == []
    assert bt.RAW_MATH.findall("plain \\(x^2\\) text")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
