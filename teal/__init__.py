"""TEAL: training-free activation sparsity (arXiv 2408.14690) for the models in model.py.

sparsify / densify switch thresholds on PackedLinear projections; calibrate.py writes the
thresholds file that load_thresholds reads; realized_sparsity measures what a setting skips.
"""
from teal.sparsify import dense_fallbacks, densify, realized_sparsity, sparsify
from teal.thresholds import load_targets, load_thresholds

__all__ = ["dense_fallbacks", "densify", "load_targets", "load_thresholds", "realized_sparsity", "sparsify"]
