"""Developer tooling, kept out of the wheel: ``python -m tools.benchmarks`` writes BENCHMARKS.md from the ``bench``
experiment, ``python -m tools.overhead`` times slimlab's own overhead against a plain script (``make bench`` runs
both from the repository root).
"""
