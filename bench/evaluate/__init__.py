"""Evaluation: what a trained multi-exit network's outputs say. `logits` collects and stores what the exits
report on the calibration and test splits (`batches` runs a model over a loader: on a CPU the batches in
parallel single-threaded workers, the same bits, progress on stderr); `protocol` turns those outputs into the
anytime table, the MSDNet budgeted-batch protocol (39 budgets, thresholds fitted on held-out data), the threshold
sweep and a trial's summary; `curves` is the one implementation of the budgeted curve (envelope, acc@MACs, AUC,
MACs to reach), used by the summary and by every report; `latency` runs the network with real early exits and
measures it; `cli` holds the `budget`, `evaluate` and `latency` commands (and the budget report's text tables).
Nothing here trains or imports the trial loop."""
