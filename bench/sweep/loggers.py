"""What a sweep shows and sends while it runs: Tune's live trial table (the varied fields, the seed, the latest
epoch) and the opt-in experiment trackers (W&B, MLflow) through Ray Tune's own logger callbacks."""

from __future__ import annotations

import inspect

from ray import tune

from bench.config import SweepConfig
from bench.errors import UsageError
from bench.sweep.grid import varied_columns


def reporter(sweep: SweepConfig):
    """Tune's live table of a sweep's trials."""
    return tune.CLIReporter(parameter_columns=varied_columns(sweep),
                            metric_columns={"epoch": "epoch", "val_acc_last": "val_acc_last"},
                            max_report_frequency=30, max_progress_rows=40, max_error_rows=10, max_column_length=30)


# Opt-in experiment trackers, through Ray Tune's own logger callbacks: field -> (package, module, class, the
# option that names the run group, set to the sweep's name unless given)
LOGGERS = {"wandb": ("wandb", "ray.air.integrations.wandb", "WandbLoggerCallback", "project"),
           "mlflow": ("mlflow", "ray.air.integrations.mlflow", "MLflowLoggerCallback", "experiment_name")}


def logger_callbacks(sweep: SweepConfig) -> list:
    """Ray Tune's W&B / MLflow callbacks for the trackers a sweep opts into (`loggers: {wandb: {...}}`)."""
    import importlib
    import importlib.util

    callbacks = []
    for name, options in sweep.loggers.items():
        package, module, class_name, group = LOGGERS[name]
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"loggers.{name}: the {package} package is not installed; pip install {package} "
                             f"(on every node of the cluster), or drop loggers.{name}")
        cls = getattr(importlib.import_module(module), class_name)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            valid = [p for p in params if p != "self"]
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise UsageError(f"loggers.{name}.{unknown[0]}: not an option of Ray's {class_name}; valid: "
                                 f"{', '.join(valid)}")
        callbacks.append(cls(**{group: sweep.name, **options}))
    return callbacks
