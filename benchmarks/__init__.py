"""Speed benchmarks (GPU): kernels, end-to-end decode, tuning, profiling."""
