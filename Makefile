# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

# A semi-supervised method (Dual Teacher) on the procedural toy dataset, a few minutes on 2 CPU cores;
# prints mIoU at every evaluation. Results, overlays and checkpoints go to runs/demo_toy.
demo: $(STAMP)
	$(BIN)/python methods/dual_teacher.py --dataset toy --split 1/8 --iters 300 --eval-every 100 \
		--num-workers 2 --out runs/demo_toy --overwrite

# The whole test suite (unit tests, end-to-end runs of every method in 1 and 2 processes, resume).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
