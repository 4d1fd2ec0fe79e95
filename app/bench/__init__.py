"""Benchmarks behind ``python -m app bench <name>`` (SPEC §7); see :mod:`app.bench.cli`."""
