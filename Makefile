# The two commands a newcomer needs (root, fresh Debian 12); both do their own set-up.
PY ?= /opt/vmimagemanager/bin/python

.PHONY: demo test deps lint bench bench-sge

deps:
	bash harness/install-deps.sh
	bash harness/pool-accounts.sh

demo:
	bash harness/demo.sh

# Integration tests must fail, never skip, when a daemon is missing: VMIM_INTEGRATION=1.
test: deps
	bash harness/libvirt-up.sh
	bash harness/sge-cell.sh up
	$(PY) -m ruff check vmimagemanager tests examples benchmarks packaging
	VMIM_INTEGRATION=1 $(PY) -m pytest -q --durations=15

# Benchmarks run as modules from the tree's top (they import tests.support from the tree).
bench: deps
	bash harness/libvirt-up.sh
	$(PY) -m benchmarks.overhead --jobs 3
	$(PY) -m benchmarks.imports
	$(PY) -m benchmarks.boot --jobs 3
	$(PY) -m benchmarks.overlay_vs_copy
	$(PY) -m benchmarks.shared_home

# Through the real SGE cell: start latency (3 jobs), the 100-job stress run (~7 min, TCG; writes
# results/stress-timeline.png), the chaos run, warm spares against the cold path in one run, and
# the three start paths (cold, snapshot, spare) side by side.
bench-sge: deps
	bash harness/libvirt-up.sh
	$(PY) -m benchmarks.sge_stress latency --jobs 3
	$(PY) -m benchmarks.sge_stress stress --jobs 100 --slots 2
	$(PY) -m benchmarks.chaos --jobs 100 --slots 2 --seed 11
	$(PY) -m benchmarks.spares --jobs 100 --latency-jobs 3 --job-slots 2 --spares 2 --payloads 0,5
	$(PY) -m benchmarks.start_paths --latency-jobs 5 --jobs 100
