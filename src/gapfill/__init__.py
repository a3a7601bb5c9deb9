"""gapfill: find the transactions missing from an EVM transaction database and fill them in."""

__version__ = "0.1.0"
