.PHONY: install test bench demo

install:
	python -c "import torch" 2>/dev/null || pip install torch==2.13.0
	pip install -e ".[test]"

test:
	python -m pytest -q

bench:
	python benchmarks/bench_scan.py
	python benchmarks/bench_monitor.py
	python benchmarks/bench_prune.py

demo:
	deadrelu demo
