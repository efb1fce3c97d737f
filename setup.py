# Metadata and entry points are in setup.cfg. This shim is for the package builds (Debian's
# pybuild, the RPM spec's %py3_build / %py3_install), which call setup.py.
from setuptools import setup

setup()
