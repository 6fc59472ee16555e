# The book's two jobs (see README):  make book   |   make test
# Both install into .venv first and prepare the offline data; neither needs a GPU.
VENV    ?= .venv
PY      := $(VENV)/bin/python
JB      := $(VENV)/bin/jupyter-book
CHAPTERS := intro
SMOKE   := _build/smoke

.PHONY: install data test smoke assemble book clean
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

test: install data
	$(PY) -m pytest -q

# Execute every chapter notebook at the smoke preset (finished runs come from the cache).
smoke: install data
	mkdir -p $(SMOKE)
	@for c in $(CHAPTERS); do \
	  $(PY) -m repro run $$c --preset smoke --output $(SMOKE)/$$c.ipynb || exit 1; \
	done

# The book shows a chapter's published run (book/published/<c>/<c>.ipynb) where there is
# one, else the smoke execution.
assemble: smoke
	mkdir -p book/chapters
	@for c in $(CHAPTERS); do \
	  if [ -f book/published/$$c/$$c.ipynb ]; then src=book/published/$$c/$$c.ipynb; \
	  else src=$(SMOKE)/$$c.ipynb; fi; \
	  echo "book/chapters/$$c.ipynb <- $$src"; cp $$src book/chapters/$$c.ipynb; \
	done

book: assemble
	$(JB) build . -W -n --keep-going
	@echo "open _build/html/index.html"

clean:
	rm -rf _build book/chapters
