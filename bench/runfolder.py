"""A run folder's files, by name: what `exitbench train` (and each sweep trial) writes, and what evaluation,
latency and resume read back.

    config.yaml     the validated, fully defaulted TrialConfig
    checkpoint.pt   model, readout, optimiser, scheduler, strategy state, RNG states, epoch (written atomically)
    metrics.jsonl   one line of metrics per finished epoch
    logits.pt       per-exit outputs (readout applied) and raw logits on the calibration and test splits
                    (bench.evaluate.logits)
    result.json     the ResultRecord (bench.results)
"""

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOGITS = "logits.pt"
RESULT = "result.json"
