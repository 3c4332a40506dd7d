"""benchmarks/profile_speculative.py's trace summary on a hand-made Chrome trace."""
from benchmarks.profile_speculative import merged_intervals, summarize


def test_merged_intervals_joins_overlaps_only():
    assert merged_intervals([(5, 8), (0, 3), (2, 4), (8, 9)]) == [(0, 4), (5, 9)]


def test_summary_finds_the_idle_gaps_and_the_cpu_work_inside_them():
    kernel = lambda ts, dur: {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur}  # noqa: E731
    trace = {"traceEvents": [
        kernel(0, 10), kernel(15, 10), kernel(20, 2), kernel(100, 10), kernel(300, 50),
        {"ph": "X", "cat": "cpu_op", "name": "aten::argmax", "ts": 30, "dur": 60},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 110, "dur": 500},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 50},  # not a span: ignored
    ]}
    s = summarize(trace, min_gap_us=20)
    assert s["gpu_busy_us"] == 10 + 10 + 10 + 50  # the kernel inside another adds nothing
    assert s["gpu_span_us"] == 350 and s["gpu_idle_us"] == 270
    assert s["idle_gaps_over_min"] == 2 and s["idle_us_in_those_gaps"] == 265  # the 5 us gap is below 20
    first, second = s["longest_gaps"]
    assert first == {"gap_us": 190, "cpu_ops_us": {"cudaStreamSynchronize": 190}}
    assert second == {"gap_us": 75, "cpu_ops_us": {"aten::argmax": 60}}
