"""Benchmarks of shadowpeft: thin scripts over public functions, sharing one harness (``benchmarks.harness``).

Not installed with the package. Run a benchmark from the repository root as a module, e.g.
``.venv/bin/python -m benchmarks.decode_speed --smoke``; the tests import them as ``benchmarks.<name>``.
"""
