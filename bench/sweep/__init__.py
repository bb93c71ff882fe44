"""Sweeps on Ray Tune: a SweepConfig becomes a `tune.Tuner` over one function trainable that calls the trial
engine (bench.trial). Tune does the orchestration (scheduling, resources, many nodes); the engine does the work.
`grid` expands a sweep into jobs; `runner` is the trainable (one job, its checkpoints, its record); `store` the
results sink and the driver's records of trials a trainable cannot record; `cluster` the checks before Ray
starts, Ray itself and the resources of distributed trials; `loggers` the live table and opt-in trackers;
`lock` one driver per sweep folder; `driver` starting and resuming; `cli` the `exitbench sweep` command.

A sweep folder `<storage_path>/<name>/` holds:

    sweep.yaml            the validated SweepConfig (`--resume` reads it back)
    jobs.json             the expanded sweep: every trial's key, label and full config (search values drawn),
                          and the --include plugins it started with (`--resume` imports them again)
    driver.lock           the running driver's pid, host and the Ray processes it started
    store/                the results store (bench.results): runs, exits, budgets, epochs, records
    <key>_<label>/        the trial folder (the label names the grid point: `method=l2w`, `lr=0.1`, ...;
                          evaluate, budget and latency take it, see bench.runfolder): checkpoint_NNNNNN/
                          (the engine's checkpoint after each epoch, the newest `keep_checkpoints`),
                          checkpoint_resume/ (the one a resumed attempt continued from), run/ (config.yaml,
                          metrics.jsonl, logits.pt, result.json of a finished trial)
    experiment_state-*.json, tuner.pkl, ...   Ray's experiment state: written by Tune, never read back

Resume is built from exitbench's own state only (jobs.json, the store, the trial folders): `--resume` runs a
new Tuner over the jobs without a finished or stopped record, and each continues from the newest checkpoint
in its folder that loads. A kill at any moment (Tune's state half-written included) loses at most the epochs
since the last checkpoint, and no pickle from the sweep folder is ever loaded.

Failures: a trial that raises (or diverges) writes a failed record, then re-raises so Tune marks it ERROR;
`--resume` continues failed trials from their last checkpoint (a passing fault heals, a divergence recurs and
is recorded again), or with trial-field overrides starts them again from epoch 0 with the new settings, and
never runs a finished trial again. A driver-side callback records what a trial cannot: trials stopped early
by ASHA and trials whose worker died.
"""
