"""Static check that a built site renders offline: no page or stylesheet pulls a script,
stylesheet, font, image or frame from another host (http://, https:// or protocol-relative
//), and the local MathJax is present and is the one the pages load.

    python tools/check_site.py _build/html

Links (<a href>) to other sites are fine: they are navigation, not assets. Exit status 1 and a
list of offenders if anything would be fetched from the network.
"""
from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

REMOTE = re.compile(r"^\s*(https?:)?//", re.I)
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""", re.I)
# (tag, attribute) pairs that make the browser fetch something.
ASSET_ATTRS = {("script", "src"), ("img", "src"), ("iframe", "src"), ("source", "src"),
               ("source", "srcset"), ("img", "srcset"), ("video", "src"), ("audio", "src"),
               ("embed", "src"), ("object", "data"), ("video", "poster"), ("input", "src")}
JS_URL = re.compile(r"""["'`]((?:https?:)?//[^"'`\s]+)["'`]""")
LINK_RELS_FETCHED = {"stylesheet", "preload", "prefetch", "modulepreload", "icon",
                     "shortcut", "apple-touch-icon", "manifest", "preconnect", "dns-prefetch"}


class _AssetParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.assets: list[tuple[str, str]] = []  # (what, url)
        self.inline_css: list[str] = []
        self.inline_js: list[str] = []
        self._in_style = self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for attr in ("src", "srcset", "data", "poster"):
            if (tag, attr) in ASSET_ATTRS and a.get(attr):
                for url in a[attr].split(",") if attr == "srcset" else [a[attr]]:
                    self.assets.append((f"<{tag} {attr}>", url.strip().split(" ")[0]))
        if tag == "link" and a.get("href"):
            rels = set((a.get("rel") or "").lower().split())
            if rels & LINK_RELS_FETCHED:
                self.assets.append((f"<link rel={a.get('rel')}>", a["href"]))
        if a.get("style"):
            self.inline_css.append(a["style"])
        self._in_style = tag == "style"
        self._in_script = tag == "script" and not a.get("src")

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_style:
            self.inline_css.append(data)
        if self._in_script:
            self.inline_js.append(data)


def css_urls(css: str) -> list[str]:
    return [m.group(1) or m.group(2) for m in CSS_URL.finditer(css)]


def remote_assets_in_html(text: str) -> list[tuple[str, str]]:
    p = _AssetParser()
    p.feed(text)
    found = [(what, url) for what, url in p.assets if REMOTE.match(url)]
    found += [("inline css url()", u) for css in p.inline_css for u in css_urls(css)
              if REMOTE.match(u)]
    # Inline scripts that name a remote script/CDN (e.g. a loader's URL constant).
    found += [("inline <script>", u) for js in p.inline_js for u in JS_URL.findall(js)]
    return found


def remote_assets_in_css(text: str) -> list[str]:
    return [u for u in css_urls(text) if REMOTE.match(u)]


def check(site: Path) -> list[str]:
    """Problems found in the built site (empty: it renders offline)."""
    site = Path(site)
    problems = []
    pages = sorted(site.rglob("*.html"))
    if not pages:
        return [f"no HTML pages under {site}"]
    for page in pages:
        rel = page.relative_to(site)
        if rel.parts[0] == "_static" and "mathjax" in rel.parts:
            continue
        for what, url in remote_assets_in_html(page.read_text(errors="replace")):
            problems.append(f"{rel}: {what} loads {url}")
    for css in sorted(site.rglob("*.css")):
        for url in remote_assets_in_css(css.read_text(errors="replace")):
            problems.append(f"{css.relative_to(site)}: url() loads {url}")
    mathjax = site / "_static" / "mathjax" / "tex-chtml.js"
    if not mathjax.exists():
        problems.append("_static/mathjax/tex-chtml.js missing: math would not render offline")
    fonts = list((site / "_static" / "mathjax").rglob("*.woff")) if mathjax.exists() else []
    if mathjax.exists() and not fonts:
        problems.append("_static/mathjax has no woff fonts")
    # Sphinx adds MathJax only to pages with math: at least one page must load the local copy.
    if not any("_static/mathjax/tex-chtml.js" in p.read_text(errors="replace") for p in pages):
        problems.append("no page loads the local _static/mathjax/tex-chtml.js")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = Path(argv[0] if argv else "_build/html")
    problems = check(site)
    n_pages = len(list(site.rglob("*.html")))
    if problems:
        print(f"check_site: {len(problems)} remote asset(s) in {site}:", *problems, sep="\n  ")
        return 1
    print(f"check_site: {n_pages} pages and their stylesheets load nothing from the network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
