# `make demo` and `make test` each do the whole set-up from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BNCTL  := $(VENV)/bin/bnctl
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
OUT    := build/demo

.PHONY: demo test bench samples clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[plot,parquet]'
	touch $@

$(VENV)/.test-installed: pyproject.toml constraints.txt tests/corpus/requirements.txt | $(PY)
	$(PIP) -e '.[test]'
	$(PIP) --no-deps -r tests/corpus/requirements.txt
	touch $@

demo: $(VENV)/.demo-installed
	@mkdir -p $(OUT)
	@echo "\$$ bnctl inspect samples/checkpoints/sample.pt"
	@$(BNCTL) inspect samples/checkpoints/sample.pt
	@echo "\n\$$ bnctl inspect samples/checkpoints/sample.onnx --format markdown"
	@$(BNCTL) inspect samples/checkpoints/sample.onnx --format markdown
	@echo "\n\$$ bnctl inspect samples/broken/nan_stats.pt --plot $(OUT)/nan_stats.png"
	@$(BNCTL) inspect samples/broken/nan_stats.pt --plot $(OUT)/nan_stats.png
	@echo "\n\$$ bnctl inspect samples/broken/train_mode.torchscript.pt --format json --output $(OUT)/train_mode.json"
	@$(BNCTL) inspect samples/broken/train_mode.torchscript.pt --format json --output $(OUT)/train_mode.json
	@echo "\n\$$ bnctl inspect samples/checkpoints/sample.module.pt   # a pickled module: refused without --trust"
	@$(BNCTL) inspect samples/checkpoints/sample.module.pt || true
	@echo "\n\$$ bnctl audit samples/broken samples/checkpoints/converted_zero_counter.pt   # exit 1: findings"
	@$(BNCTL) audit samples/broken samples/checkpoints/converted_zero_counter.pt || true
	@echo "\n\$$ bnctl audit samples/checkpoints/sample.pt --arch bnctl.models:sample_net --input-shape 2,3,32,32 --format sarif --output $(OUT)/audit.sarif"
	@$(BNCTL) audit samples/checkpoints/sample.pt --arch bnctl.models:sample_net --input-shape 2,3,32,32 --format sarif --output $(OUT)/audit.sarif
	@echo "\n\$$ python samples/evaluate.py samples/checkpoints/sample.pt samples/data_shifted   # darker, flatter images"
	@$(PY) samples/evaluate.py samples/checkpoints/sample.pt samples/data_shifted
	@echo "\n\$$ bnctl recalibrate samples/checkpoints/sample.pt --arch bnctl.models:sample_net --data samples/data_shifted -o $(OUT)/recalibrated.pt"
	@$(BNCTL) recalibrate samples/checkpoints/sample.pt --arch bnctl.models:sample_net --data samples/data_shifted -o $(OUT)/recalibrated.pt
	@echo "\n\$$ python samples/evaluate.py $(OUT)/recalibrated.pt samples/data_shifted"
	@$(PY) samples/evaluate.py $(OUT)/recalibrated.pt samples/data_shifted
	@echo "\n\$$ bnctl diff samples/checkpoints/sample.pt $(OUT)/recalibrated.pt"
	@$(BNCTL) diff samples/checkpoints/sample.pt $(OUT)/recalibrated.pt
	@echo "\n\$$ bnctl diff $(OUT)/recalibrated.pt --arch bnctl.models:sample_net --data samples/data_shifted --fail-above 0.01 --plot $(OUT)/drift.png"
	@$(BNCTL) diff $(OUT)/recalibrated.pt --arch bnctl.models:sample_net --data samples/data_shifted --fail-above 0.01 --plot $(OUT)/drift.png
	@echo "\n\$$ bnctl fold samples/checkpoints/sample.pt --arch bnctl.models:sample_net --input-shape 8,3,32,32 -o $(OUT)/sample_folded.pt2"
	@$(BNCTL) fold samples/checkpoints/sample.pt --arch bnctl.models:sample_net --input-shape 8,3,32,32 -o $(OUT)/sample_folded.pt2
	@echo "\n\$$ bnctl fold samples/checkpoints/sample.onnx -o $(OUT)/sample_folded.onnx"
	@$(BNCTL) fold samples/checkpoints/sample.onnx -o $(OUT)/sample_folded.onnx
	@echo "\n\$$ bnctl fold samples/deploy/int8_range.onnx -o $(OUT)/int8_range_folded.onnx --int8-check   # one dead channel: int8 per tensor suffers"
	@$(BNCTL) fold samples/deploy/int8_range.onnx -o $(OUT)/int8_range_folded.onnx --int8-check
	@echo "\n\$$ bnctl convert samples/checkpoints/sample.pt --arch bnctl.models:sample_net --to groupnorm --input-shape 2,3,32,32 -o $(OUT)/sample_gn.pt"
	@$(BNCTL) convert samples/checkpoints/sample.pt --arch bnctl.models:sample_net --to groupnorm --input-shape 2,3,32,32 -o $(OUT)/sample_gn.pt
	@echo "\n\$$ bnctl export samples/checkpoints/sample.pt --arch bnctl.models:sample_net --input-shape 1,3,32,32 --dynamic-batch -o $(OUT)/sample.onnx"
	@$(BNCTL) export samples/checkpoints/sample.pt --arch bnctl.models:sample_net --input-shape 1,3,32,32 --dynamic-batch -o $(OUT)/sample.onnx
	@echo "\n\$$ bnctl trace samples/train_forgot_eval.py --epochs 1   # exit 1: BN bugs caught as the script runs"
	@$(BNCTL) trace samples/train_forgot_eval.py --epochs 1 || true

test: $(VENV)/.test-installed
	$(PY) -m ruff check bnctl tests benchmarks samples
	$(PY) -m ruff format --check bnctl tests benchmarks samples
	BNCTL_REQUIRE_CORPUS=1 $(PY) -m pytest -q

bench: $(VENV)/.test-installed
	$(PY) benchmarks/bench_inspect.py
	$(PY) benchmarks/bench_many_layers.py
	$(PY) benchmarks/bench_fold.py
	$(PY) benchmarks/bench_audit.py
	$(PY) benchmarks/bench_recalibrate.py

samples: $(VENV)/.test-installed
	$(PY) samples/make_samples.py

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis
