"""Open every page of the built book in headless chromium and check what a reader would see.

    python tools/browser_test.py _build/html --screenshots _build/screenshots

The site is served from 127.0.0.1 (a throwaway http.server thread: fonts and scripts behave as
on a real host, which file:// does not guarantee). Every page is read twice, on a 1280-px
screen and on a 390-px phone (mobile emulation), and each time:

- every <img> has loaded (complete and naturalWidth > 0);
- every internal link points at a file that exists in the build, and its #fragment at an id
  on that page;
- math is rendered: each Sphinx math element holds MathJax output (mjx-container) and no raw
  ``$...$``, ``\\(...\\)`` or ``\\[...\\]`` is left in the visible text outside code;
- no request left the machine (Chrome's network log), and no console error;
- the layout fits: no table, equation or figure sits in a box that scrolls (or clips)
  sideways, and the page itself is no wider than the screen (code blocks may scroll);
- on a chapter page (``book/chapters/<c>.html`` for each chapter of the registry): the verdict
  box (``.admonition.verdicts``, with a badge and a link to the scorecard per claim) comes
  before the first code cell the page shows, and no visible code cell calls ``glue(``
  (glue-only plumbing is folded away with a hide-* tag);
- a full-page screenshot goes to SCREENSHOTS/<width>px/<page path>.png.

Uses Debian's chromium and chromedriver (apt-get install chromium chromium-driver) through
selenium; no browser is downloaded. Exit status 1 on any problem; a JSON report is written
next to the screenshots.
"""
from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import http.server
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio",
         "--window-size=1280,1000", "--hide-scrollbars"]
MAX_SHOT_HEIGHT = 12000
# Screen widths a page is read at, with the viewport height: a laptop, and a phone (390 px,
# emulated as a mobile device, so the page's viewport meta tag applies).
SCREENS = {1280: 1000, 390: 844}
# Console errors that say nothing about the page: no favicon; pydata-sphinx-theme reporting an
# empty light/dark preference in a fresh profile.
BENIGN = ("favicon.ico", "Got invalid theme mode")

# Raw TeX left in the visible text (outside code) means MathJax did not render it.
RAW_MATH = re.compile(r"(?<![\\$\w])\$(?!\s)[^$\n]{1,200}?(?<!\s)\$(?!\w)|\\\(.+?\\\)|\\\[.+?\\\]")

JS_PAGE_STATE = r"""
const done = arguments[arguments.length - 1];
(async () => {
  if (document.readyState !== 'complete')
    await new Promise(r => window.addEventListener('load', r, {once: true}));
  let mathjax = 'absent';
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; mathjax = 'ok'; } catch (e) { mathjax = 'error: ' + e; }
  }
  const imgs = [...document.images].map(i => ({src: i.currentSrc || i.src,
      ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  const math = [...document.querySelectorAll('.math')];
  const mathUnrendered = math.filter(m => !m.querySelector('mjx-container') &&
      !(m.tagName === 'MJX-CONTAINER')).map(m => m.textContent.slice(0, 80));
  // Visible text outside code, to look for raw TeX.
  const clone = document.body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight, textarea')
       .forEach(n => n.remove());
  done({mathjax, imgs, links, nMath: math.length, nMjx: document.querySelectorAll(
        'mjx-container').length, mathUnrendered, text: clone.innerText,
        height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
        title: document.title});
})();
"""


# What a reader sees of the layout and the reading order, as a JSON string (a plain object
# with DOM-derived strings has failed to deserialize in chromedriver).
JS_LAYOUT = r"""
const done = arguments[arguments.length - 1];
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (e) {}
  }
  const shown = el => (el.checkVisibility ? el.checkVisibility() : el.offsetParent !== null);
  const article = document.querySelector('.bd-article') || document.body;
  const what = el => el.matches('table') || el.querySelector('table') ? 'table'
      : el.matches('mjx-container') || el.querySelector('mjx-container') ? 'equation'
      : el.matches('img, svg, figure') || el.querySelector('img, svg, figure') ? 'figure' : null;
  const scrolling = [];
  for (const el of article.querySelectorAll('*')) {
    if (el.closest('pre, .highlight')) continue;  // code blocks may scroll sideways
    const cs = getComputedStyle(el);
    const scrolls = ['auto', 'scroll'].includes(cs.overflowX) && el.scrollWidth > el.clientWidth + 1;
    const clips = cs.overflowX === 'hidden' && !cs.display.startsWith('inline')
                  && el.scrollWidth > el.clientWidth + 4;
    if (!(scrolls || clips) || !shown(el)) continue;
    const kind = what(el);
    if (kind) scrolling.push(`${kind} in a ${el.scrollWidth}-px box ${el.clientWidth} px wide` +
        ` (${scrolls ? 'scrolls' : 'clipped'}): ${el.innerText.replace(/\s+/g, ' ').slice(0, 60)}`);
  }
  const cells = [...article.querySelectorAll('div.cell')];
  const inputs = cells.map(c => c.querySelector('.cell_input')).filter(i => i && shown(i));
  const box = article.querySelector('.admonition.verdicts');
  const first = inputs[0];
  done(JSON.stringify({
    width: document.documentElement.clientWidth,
    pageWidth: document.documentElement.scrollWidth,
    scrolling,
    verdicts: box ? {
      badges: box.querySelectorAll('.sd-badge').length,
      items: box.querySelectorAll('li').length,
      links: [...box.querySelectorAll('li a[href]')].filter(a => /#claim-/.test(a.href)).length,
      beforeFirstCode: !first ||
          !!(box.compareDocumentPosition(first) & Node.DOCUMENT_POSITION_FOLLOWING)} : null,
    codeCells: inputs.length,
    glueCells: inputs.filter(i => /\bglue\(/.test(i.innerText))
                     .map(i => i.innerText.trim().split('\n')[0].slice(0, 80)),
  }));
})();
"""


def chapter_pages() -> set[str]:
    """The chapter pages of the book, from the registry (tools/chapters.py)."""
    spec = importlib.util.spec_from_file_location("chapters", Path(__file__).with_name(
        "chapters.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {f"book/chapters/{c}.html" for c in mod.chapters()}


def layout_problems(layout: dict, chapter: bool) -> list[str]:
    """What a reader would trip over: sideways scrolling, and on a chapter page verdicts that
    come late (or not at all) and visible glue plumbing."""
    problems = [f"sideways scrolling: {s}" for s in layout["scrolling"]]
    if layout["pageWidth"] > layout["width"] + 1:
        problems.append(f"the page is {layout['pageWidth']} px wide on a "
                        f"{layout['width']}-px screen")
    if chapter:
        v = layout["verdicts"]
        if v is None:
            problems.append("no verdict box (.admonition.verdicts)")
        else:
            if not v["beforeFirstCode"]:
                problems.append("the verdict box comes after the first code cell")
            if not v["items"] or v["badges"] < v["items"] or v["links"] < v["items"]:
                problems.append(f"verdict box: {v['items']} claims, {v['badges']} badges, "
                                f"{v['links']} links to the scorecard")
        problems += [f"a visible code cell glues values: {g!r}" for g in layout["glueCells"]]
    return problems


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("id", "name") and v:
                self.ids.add(v)


@functools.lru_cache(maxsize=None)
def page_ids(path: Path) -> frozenset[str]:
    p = _Ids()
    p.feed(path.read_text(errors="replace"))
    return frozenset(p.ids)


def serve(root: Path):
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def set_screen(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1,
                            "mobile": width < 600})


def screenshot(driver, path: Path, width: int, height: int) -> None:
    """A full-page screenshot (up to MAX_SHOT_HEIGHT) at ``width``; the screen is restored."""
    set_screen(driver, width, max(600, min(int(height), MAX_SHOT_HEIGHT)))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png",
                                                              "captureBeyondViewport": False})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    set_screen(driver, width, SCREENS[width])


def check_link(href: str, page_url: str, base: str, site: Path) -> str | None:
    """None if fine (or external), else a description of the broken link."""
    url, frag = urldefrag(href)
    parsed = urlparse(url)
    if parsed.scheme in ("mailto", "javascript", "data", "tel"):
        return None
    if not url.startswith(base):
        return None  # another site: navigation, not checked offline
    rel = unquote(url[len(base):]) or "index.html"
    target = site / rel
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{href}: {rel} does not exist in the build"
    if frag and target.suffix == ".html" and unquote(frag) not in page_ids(target):
        return f"{href}: no id {frag!r} on {rel}"
    return None


def check_page(driver, site: Path, base: str, rel: str, width: int, shots: Path,
               chapter: bool) -> dict:
    """Load one page at one screen width, check it, screenshot it; returns its report entry."""
    url = urljoin(base, rel)
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get_log("browser")
    t0 = time.time()
    driver.get(url)
    state = driver.execute_async_script(JS_PAGE_STATE)
    layout = json.loads(driver.execute_async_script(JS_LAYOUT))
    problems = []
    if driver.current_url.rstrip("/") != url.rstrip("/") and rel != "index.html":
        problems.append(f"navigated away to {driver.current_url}")
    for img in state["imgs"]:
        if not img["ok"]:
            problems.append(f"image did not load: {img['src']}")
    links = sorted(set(state["links"]))
    for href in links:
        bad = check_link(href, url, base, site)
        if bad:
            problems.append(f"broken link {bad}")
    if state["mathjax"].startswith("error"):
        problems.append(f"MathJax failed: {state['mathjax']}")
    if state["mathUnrendered"]:
        problems.append(f"{len(state['mathUnrendered'])} math element(s) not rendered, "
                        f"e.g. {state['mathUnrendered'][0]!r}")
    raw = RAW_MATH.findall(state["text"])
    if raw:
        problems.append(f"raw TeX left in the text: {raw[:3]}")
    requests = set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            requests.add(msg["params"]["request"]["url"])
    remote = sorted(u for u in requests if not (u.startswith(base) or
                    u.startswith(("data:", "blob:", "about:", "chrome"))))
    if remote:
        problems.append(f"requests left the machine: {remote}")
    errors = [e["message"] for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and not any(b in e["message"] for b in BENIGN)]
    if errors:
        problems.append(f"console errors: {errors[:3]}")
    problems += layout_problems(layout, chapter)
    shot = shots / f"{width}px" / (rel[:-len(".html")] + ".png")
    screenshot(driver, shot, width, state["height"])
    return {"page": rel, "width": width, "title": state["title"],
            "images": len(state["imgs"]), "links": len(links), "math": state["nMath"],
            "mathjax_outputs": state["nMjx"], "requests": len(requests),
            "sideways_scrolling": len(layout["scrolling"]), "code_cells": layout["codeCells"],
            "verdicts": layout["verdicts"], "seconds": round(time.time() - t0, 2),
            "screenshot": str(shot), "problems": problems}


def run(site: Path, shots: Path, pages: list[Path] | None = None) -> dict:
    """Check ``pages`` (default: every page of the site, which must include every chapter)."""
    site = site.resolve()
    every_page = pages is None
    pages = pages or sorted(p for p in site.rglob("*.html")
                            if p.relative_to(site).parts[0] not in ("_static", "_sources"))
    chapters = chapter_pages()
    httpd, base = serve(site)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    shutil.rmtree(shots, ignore_errors=True)
    report = {"pages": [], "problems": []}
    driver = make_driver(profile)
    try:
        for width, height in SCREENS.items():
            set_screen(driver, width, height)
            for page in pages:
                rel = page.relative_to(site).as_posix()
                entry = check_page(driver, site, base, rel, width, shots, rel in chapters)
                report["pages"].append(entry)
                report["problems"] += [f"{rel} @{width}px: {p}" for p in entry["problems"]]
                print(f"  {rel} @{width}px: {entry['images']} images, {entry['links']} links, "
                      f"{entry['math']} math ({entry['mathjax_outputs']} rendered), "
                      f"{entry['requests']} requests, {entry['sideways_scrolling']} sideways"
                      + (f" -- {len(entry['problems'])} PROBLEM(S)" if entry["problems"]
                         else " -- ok"))
    finally:
        driver.quit()
        httpd.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    if every_page:
        report["problems"] += [f"{c}: chapter page missing from the build" for c in
                               sorted(chapters - {e["page"] for e in report["pages"]})]
    shots.mkdir(parents=True, exist_ok=True)
    (shots / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site", nargs="?", default="_build/html")
    ap.add_argument("--screenshots", default="_build/screenshots")
    args = ap.parse_args(argv)
    site = Path(args.site)
    if not (site / "index.html").exists():
        print(f"browser_test: no built site at {site} (run `make book` first)", file=sys.stderr)
        return 2
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not Path(exe).exists():
            print(f"browser_test: {exe} missing: apt-get install -y chromium chromium-driver",
                  file=sys.stderr)
            return 2
    t0 = time.time()
    report = run(site, Path(args.screenshots))
    pages = report["pages"]
    print(f"browser_test: {len({p['page'] for p in pages})} pages at "
          f"{', '.join(f'{w} px' for w in SCREENS)}, {sum(p['images'] for p in pages)} images, "
          f"{sum(p['links'] for p in pages)} links, {sum(p['math'] for p in pages)} math "
          f"elements checked in {time.time() - t0:.0f}s; screenshots in {args.screenshots}")
    if report["problems"]:
        print(f"browser_test: {len(report['problems'])} problem(s):",
              *report["problems"], sep="\n  ")
        return 1
    print("browser_test: all pages ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
