# The book's two jobs (see README):  make book   |   make test
# Both install into .venv first and prepare the offline data; neither needs a GPU.
VENV    ?= .venv
PY      := $(VENV)/bin/python
JB      := $(VENV)/bin/jupyter-book
# The chapters come from the registry (CHAPTERS in repro/experiments/__init__.py, read by
# tools/chapters.py without importing torch): adding a chapter there is all the Makefile needs.
CHAPTERS := $(shell python3 tools/chapters.py)
SMOKE   := _build/smoke

.PHONY: install data test check-built-book smoke assemble book check-site browser-test clean
.DEFAULT_GOAL := book

$(VENV)/.installed: pyproject.toml .ci/requirements-nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch==2.13.0 resolves to the CPU wheel where one is on disk (pip find-links); on a
	# reader's CUDA machine it is the CUDA build of the same version.
	$(PY) -m pip install -q -e ".[test]"
	# Test-only cross-check packages whose declared dependencies would drag in torchvision.
	$(PY) -m pip install -q --no-deps -r .ci/requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) -m repro data prepare

# The whole suite as a user's machine runs it (amp="auto": bf16 on a CPU with native bf16,
# fp32 elsewhere), then the precision-dependent tests (marker `precision`) again in the other
# precision, so every CPU checks both: fp32 where "auto" is bf16, and on an AVX2 CPU (bf16
# emulated, 9-35x slower) the chosen bf16 subset.
OTHER_AMP = $(shell $(PY) tools/other_precision.py 2>/dev/null)

test: install data
	$(PY) -m pytest -q
	@test -n "$(OTHER_AMP)" || { echo "tools/other_precision.py failed"; exit 1; }
	@echo "=== precision-dependent tests again with REPRO_AMP=$(OTHER_AMP)"
	REPRO_AMP=$(OTHER_AMP) $(PY) -m pytest -q -m precision

# The tests of the built site (marker built_book), after `make book`; a missing site fails.
check-built-book: install
	REPRO_BUILT_BOOK=1 $(PY) -m pytest -q -m built_book tests/test_book.py

# Execute every chapter notebook at the smoke preset (finished runs come from the cache).
smoke: install data
	mkdir -p $(SMOKE)
	@test -n "$(CHAPTERS)" || { echo "no chapters: tools/chapters.py found none"; exit 1; }
	@for c in $(CHAPTERS); do \
	  $(PY) -m repro run $$c --preset smoke --output $(SMOKE)/$$c.ipynb || exit 1; \
	done

# The book shows a chapter's published run (book/published/<c>/<c>.ipynb) where there is
# one, else the smoke execution; the scorecard is generated from book/published/.
assemble: smoke
	rm -rf book/chapters
	$(PY) -m repro.publish assemble $(SMOKE) book/chapters
	$(PY) -m repro.scorecard book/chapters/scorecard.md

book: assemble
	$(JB) build . -W -n --keep-going
	$(PY) tools/check_site.py _build/html
	@echo "open _build/html/index.html"

# Static check of the built site: no http(s) script, stylesheet, font or image (offline book).
check-site:
	$(PY) tools/check_site.py _build/html

# Every built page in headless chromium (Debian's chromium + chromedriver): images load,
# internal links resolve, MathJax rendered, no request leaves the machine; screenshots go to
# _build/screenshots/.
browser-test: install
	$(PY) tools/browser_test.py _build/html --screenshots _build/screenshots

clean:
	rm -rf _build book/chapters
