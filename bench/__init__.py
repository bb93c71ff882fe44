"""exitbench: a benchmarking and ablation harness for early-exiting (multi-exit) networks."""

__version__ = "0.1.0"
