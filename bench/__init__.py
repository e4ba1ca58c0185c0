"""Benchmarks and GPU checks of rlvr-vocab; run each as ``python -m bench.<module>`` from the repository root.

``bench.gpu_session`` runs them all on one GPU within a time budget (see BENCHMARKS.md).
"""
