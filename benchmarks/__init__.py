"""Benchmarks of braze_assets against the local Braze emulator: `python -m benchmarks.run`."""
