"""deploykit: train → compress → convert → integrate → test for INT8 CNNs with LUT activations."""

__version__ = "0.1.0"
