"""Benchmarks: ``python -m bench`` (or ``make bench``).

``harness.py`` (the local stack, sizes, the section registry), ``baselines.py``, one module per section
in ``sections/``.
"""
