"""Test doubles that ship with gapfill: a provider emulator (and a local node helper)."""
