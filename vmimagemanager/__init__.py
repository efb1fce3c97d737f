"""vmimagemanager: run every Grid batch job inside its own freshly booted virtual machine."""
__version__ = "0.1.0"
