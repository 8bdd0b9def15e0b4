"""Evaluation: benchmark protocols and metrics.

:mod:`spfm.eval.hest_bench` runs the HEST-Benchmark protocol (log1p targets, scaler + PCA 256, Ridge, per-gene
Pearson) on embeddings, as ``spfm bench hest`` does.
"""

from spfm.eval.hest_bench import (
    bench_hest,
    hest_benchmark,
    leave_one_patient_out,
    leave_one_sample_out,
    read_hest_splits,
)

__all__ = ["bench_hest", "hest_benchmark", "leave_one_patient_out", "leave_one_sample_out", "read_hest_splits"]
