"""Open every page of the built book in headless chromium and check what a reader would see.

    python tools/browser_test.py _build/html --screenshots _build/screenshots

The site is served from 127.0.0.1 (a throwaway http.server thread: fonts and scripts behave as
on a real host, which file:// does not guarantee). For each page:

- every <img> has loaded (complete and naturalWidth > 0);
- every internal link points at a file that exists in the build, and its #fragment at an id
  on that page;
- math is rendered: each Sphinx math element holds MathJax output (mjx-container) and no raw
  ``$...$``, ``\\(...\\)`` or ``\\[...\\]`` is left in the visible text outside code;
- no request left the machine (Chrome's network log), and no console error;
- a full-page screenshot goes to SCREENSHOTS/<page path>.png.

Uses Debian's chromium and chromedriver (apt-get install chromium chromium-driver) through
selenium; no browser is downloaded. Exit status 1 on any problem; a JSON report is written
next to the screenshots.
"""
from __future__ import annotations

import argparse
import base64
import functools
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


def screenshot(driver, path: Path, height: int) -> None:
    h = max(600, min(int(height), MAX_SHOT_HEIGHT))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": h, "deviceScaleFactor": 1, "mobile": False})
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png",
                                                              "captureBeyondViewport": False})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


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


def run(site: Path, shots: Path, pages: list[Path] | None = None) -> dict:
    site = site.resolve()
    pages = pages or sorted(p for p in site.rglob("*.html")
                            if p.relative_to(site).parts[0] not in ("_static", "_sources"))
    httpd, base = serve(site)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    shutil.rmtree(shots, ignore_errors=True)
    report = {"pages": [], "problems": []}
    driver = make_driver(profile)
    try:
        for page in pages:
            rel = page.relative_to(site).as_posix()
            url = urljoin(base, rel)
            driver.get_log("performance")  # drop what earlier pages logged
            driver.get_log("browser")
            t0 = time.time()
            driver.get(url)
            state = driver.execute_async_script(JS_PAGE_STATE)
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
            shot = shots / (rel[:-len(".html")] + ".png")
            screenshot(driver, shot, state["height"])
            report["pages"].append({
                "page": rel, "title": state["title"], "images": len(state["imgs"]),
                "links": len(links), "math": state["nMath"], "mathjax_outputs": state["nMjx"],
                "requests": len(requests), "seconds": round(time.time() - t0, 2),
                "screenshot": str(shot), "problems": problems})
            report["problems"] += [f"{rel}: {p}" for p in problems]
            print(f"  {rel}: {len(state['imgs'])} images, {len(links)} links, "
                  f"{state['nMath']} math ({state['nMjx']} rendered), {len(requests)} requests"
                  + (f" -- {len(problems)} PROBLEM(S)" if problems else " -- ok"))
    finally:
        driver.quit()
        httpd.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
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
    print(f"browser_test: {len(pages)} pages, {sum(p['images'] for p in pages)} images, "
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
