"""vmimagemanager's tests: unit/ (no daemon), vm/ (real libvirtd and QEMU guests), cell/ (a real
batch system or compute element), and support/, the helpers they and benchmarks/ import."""
