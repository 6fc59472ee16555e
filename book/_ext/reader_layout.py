"""Pages that fit the reader's screen: the book's stylesheet and its table script.

``book/_static/repro-book.css`` makes tables, equations and figures fit the text column (no
sideways-scrolling boxes at 1280 px or on a 390-px phone) and styles the chapters' verdict
boxes and the scorecard's claim cards; ``book/_static/repro-book.js`` labels every table cell
with its column header, so that on a narrow screen a wide table shows one row at a time as a
stack of "header: value" lines. ``tools/browser_test.py`` checks both widths.
"""
from pathlib import Path

STATIC = Path(__file__).resolve().parent.parent / "_static"


def _add_static_path(app, config):
    config.html_static_path = list(config.html_static_path) + [str(STATIC)]


def setup(app):
    app.connect("config-inited", _add_static_path)
    app.add_css_file("repro-book.css")
    app.add_js_file("repro-book.js")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
