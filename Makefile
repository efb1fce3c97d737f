# The two commands a newcomer needs (root, fresh Debian 12); both do their own set-up.
PY ?= /opt/vmimagemanager/bin/python

.PHONY: demo test deps lint bench

deps:
	bash harness/install-deps.sh
	bash harness/pool-accounts.sh

demo:
	bash harness/demo.sh

# Integration tests must fail, never skip, when a daemon is missing: VMIM_INTEGRATION=1.
test: deps
	bash harness/libvirt-up.sh
	bash harness/sge-cell.sh up
	$(PY) -m ruff check vmimagemanager tests examples benchmarks
	VMIM_INTEGRATION=1 $(PY) -m pytest -q --durations=15

bench: deps
	bash harness/libvirt-up.sh
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/overlay_vs_copy.py
