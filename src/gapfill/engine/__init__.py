"""Modes (sequential, batch, concurrent, auto), coordinator, workers, leases, supervision."""
