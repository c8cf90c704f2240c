"""Benchmarks. Each prints ratios against a baseline measured in the same run.

    python -m bench.run [--quick] [--only a,c]  # every section as one table (make bench)
    python -m bench.settlement_gas              # gas per job: cumulative vouchers vs escrow

What each figure measures and the latest table: docs/PERFORMANCE.md (gas: docs/PAYMENTS.md).
"""
