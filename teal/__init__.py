"""TEAL: training-free activation sparsity (arXiv 2408.14690) for the models in model.py.

sparsify / densify switch thresholds on PackedLinear projections; calibrate.py writes the
thresholds file that load_thresholds reads; realized_sparsity measures what a setting skips.
"""
from teal.sparsify import densify, realized_sparsity, sparsify
from teal.thresholds import load_thresholds

__all__ = ["densify", "load_thresholds", "realized_sparsity", "sparsify"]
