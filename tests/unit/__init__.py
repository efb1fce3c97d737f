"""Tests that need no daemon (libvirt's in-process test:///default driver counts as none)."""
