"""Robustness through the package's pytest plugin (lcnn_plugin.pytest_plugin), as a user's own
benchmark file would: an ε sweep per model, and the PGD / eval-forward cost of an LCNN against
its standard twin (same skeleton, same batch).

Run: ``pytest benchmarks/test_robustness_bench.py [--lcnn-models ...] [--lcnn-data D]
[--lcnn-examples N] [--lcnn-attacks ...] [--lcnn-eps-linf ...]`` (``pytest --help``, group
lcnn-plugin). The figures are in extra_info["lcnn"]; ``lcnn bench-report FILE.json`` renders
them. Target (asserted when timing): PGD on the LCNN ResNet-18 takes at most 1.10× the time of
PGD on the standard ResNet-18.
"""

from __future__ import annotations


def test_robustness_sweep(lcnn_robustness):
    lcnn_robustness(checks=False)


def test_pgd_lcnn_vs_standard(lcnn_throughput, benchmark):
    ratio = lcnn_throughput("pgd", rounds=2)
    if not benchmark.disabled:
        assert ratio <= 1.10


def test_eval_forward_lcnn_vs_standard(lcnn_throughput):
    lcnn_throughput("eval_forward")
