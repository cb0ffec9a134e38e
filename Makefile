# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when missing
# and installs torch (pinned CPU build) and the package into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BNR := $(VENV)/bin/bnrewrite
TORCH_PIN := torch==2.13.0
DEMO_OUT := .demo

.PHONY: demo test lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $@

demo: $(VENV)/.installed
	@mkdir -p $(DEMO_OUT)
	@echo "== 1. analyze: every norm layer of a ResNet-style sample, with its fold verdict =="
	$(BNR) analyze samples.resnet:build
	@echo "== 2. fold + verify, written as a torch.export program, with a before/after graph =="
	$(BNR) fold samples.resnet:build -o $(DEMO_OUT)/resnet_folded.pt2 --verify --graph $(DEMO_OUT)/resnet_fold.svg --force
	@echo "== 3. verify the written file against the original, independently =="
	$(BNR) verify samples.resnet:build $(DEMO_OUT)/resnet_folded.pt2
	@echo "== 4. BN after the activation: folds into the following conv where exact =="
	$(BNR) fold samples.bn_after_act:build -o $(DEMO_OUT)/bn_after_act.pt2 --verify --force
	@echo "== 5. low precision: cross-layer equalization of a MobileNetV1 for int8 weights, with a picture =="
	$(BNR) equalize samples.mobilenet_v1:build -o $(DEMO_OUT)/mobilenet_v1_equalized.pt --plot $(DEMO_OUT)/mobilenet_v1_ranges.png --force
	@echo "== 6. transformer blocks: LayerNorm/RMSNorm/GroupNorm affines into the layers that read them (--norm-affine) =="
	$(BNR) fold samples.transformer_blocks:build --norm-affine -o $(DEMO_OUT)/transformer_blocks.pt --verify --force

test: $(VENV)/.installed
	$(PY) -m ruff check bnrewrite tests samples benchmarks
	$(PY) -m ruff format --check bnrewrite tests samples benchmarks
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check --fix bnrewrite tests samples benchmarks
	$(PY) -m ruff format bnrewrite tests samples benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/fold.py
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/proof.py
	$(PY) benchmarks/analyze.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/cold.py
	$(PY) benchmarks/fd108.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .hypothesis
