"""Tests that boot real QEMU guests through libvirtd (qemu:///system), no batch system."""
