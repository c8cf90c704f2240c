"""Benchmarks. Each prints ratios against a baseline measured in the same run.

    python -m bench.settlement_gas      # gas per job: cumulative vouchers vs per-job escrow

Measured figures and how to read them: docs/PAYMENTS.md.
"""
