"""Tests that drive a real batch system or compute element (gridengine, Slurm, GRAM, ARC, the
installed packages) with real guests behind it."""
