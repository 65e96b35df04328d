# make test   — the test suite (as CI runs it)
# make bench  — all benchmark suites; JSON and a markdown summary under benchmarks/results/
#               (pass options with BENCH_ARGS, e.g. BENCH_ARGS="--lcnn-models lcnn_resnet18_cifar")
PYTHON ?= python
BENCH_OUT ?= benchmarks/results/latest

.PHONY: test bench bench-smoke
test:
	ruff check . && $(PYTHON) -m pytest -q

bench:
	mkdir -p benchmarks/results
	$(PYTHON) -m pytest benchmarks -q --benchmark-json=$(BENCH_OUT).json $(BENCH_ARGS)
	lcnn bench-report $(BENCH_OUT).json > $(BENCH_OUT).md

bench-smoke:
	$(PYTHON) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable --lcnn-models lcnn_resnet18_cifar \
		--bench-batch 2 --bench-size 8 --lcnn-examples 4 --lcnn-batch-size 4 --bench-gpu-batch 4
