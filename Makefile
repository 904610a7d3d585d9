# Set-up and everyday commands. Each target creates .venv and installs what it needs on first use.
# Everything installs from the locks in requirements/ (exact versions, hashes checked), so a fresh
# machine gets what CI tested, not whatever PyPI has today. `make lock` refreshes them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, on its own and outside the locks: users pick the build for their GPU, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128". A bare "torch"
# requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The lock to install: dev is everything `make run` and `make test` need (engine, coordinator,
# desktop and the test tools); base, coordinator, node, desktop and postgres are the roles' own.
LOCK ?= requirements/dev.txt
INSTALLED := $(VENV)/.installed-$(notdir $(basename $(LOCK)))

.PHONY: setup system-packages run tray train-demo test lint format bench screenshots lock installer test-installer clean

setup: $(INSTALLED) system-packages

# Qt's runtime libraries, fonts and Xvfb on Debian/Ubuntu (installed when missing and apt-get can run).
system-packages:
	@sh installers/debian-packages.sh

$(INSTALLED): pyproject.toml $(LOCK) requirements/uv.txt requirements/llama-cpp-python.txt installers/llama-cpp.sh
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "compute-swarm needs Python 3.10 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --require-hashes --no-deps --compile-bytecode -r $(LOCK)
	sh installers/llama-cpp.sh $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The packaged tray app for this machine's OS, in dist/ (installers/build-app.sh; Linux: a .tar.gz).
installer: system-packages
	sh installers/build-app.sh

# Re-resolve every lock in requirements/ from pyproject.toml (see the README: upgrading a dependency).
lock:
	sh installers/refresh-locks.sh

# The main job: a coordinator and one local node; prints the URL, a buyer API key and a submit command.
run: $(INSTALLED) system-packages
	$(BIN)/compute-swarm local-swarm --data-dir .swarm

# The seller's tray app (its first run asks for the coordinator, prefilled with `make run`'s).
tray: $(INSTALLED) system-packages
	$(BIN)/compute-swarm tray

# Fine-tune on this machine alone, without the swarm.
train-demo: $(INSTALLED)
	$(BIN)/compute-swarm train --data compute_swarm/engine/data/demo_chat.jsonl --steps 30 --learning-rate 1e-3 --output adapters/demo \
		--sample "What is the capital of Peru?"

test: $(INSTALLED) system-packages
	$(BIN)/python -m pytest

# The packaged app end to end: build, install in a fresh home, fetch its engine, earn (tests/test_installed_app.py).
test-installer: $(INSTALLED) system-packages
	$(BIN)/python -m pytest -m installer -s tests/test_installed_app.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(INSTALLED) system-packages
	$(BIN)/python bench/lora.py
	$(BIN)/python bench/coordinator.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/tray.py
	$(BIN)/python bench/verification.py

# Screenshots into screenshots/: the real tray window under Xvfb, and every page of the web UI in
# headless Chromium at a laptop's and a phone's size (a real coordinator, node and fine-tune each).
screenshots: $(INSTALLED) system-packages
	xvfb-run -a -s "-screen 0 1280x1024x24" env QT_QPA_PLATFORM=xcb $(BIN)/python -m tests.desktop.screenshot_tray screenshots
	$(BIN)/python -m tests.browser.screenshot_pages screenshots

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
