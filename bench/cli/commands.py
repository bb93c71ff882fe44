"""Argument parsers of the commands whose work lives in other modules.

Each parser calls one `cli_*` function of its module, imported only when the command runs, so
`exitbench --help` stays fast. The module raises bench.errors.UsageError for bad input.
"""

from __future__ import annotations

import argparse

from bench.cli.parser import command

# Every example here is run by tests/test_cli_ux.py (up to the point where Ray would start).
SWEEP_EXAMPLES = """examples:
  exitbench sweep                                   the bundled default sweep (as `make run`)
  exitbench sweep default epochs=2 seeds=[0] --name quick
                                                    a bundled sweep by name; trial fields override its base
  exitbench sweep l2w-ablation epochs=30 grid.method.epsilon=[0.8]
                                                    grid axes are replaced with grid.PATH=[...]
  exitbench sweep fashion-mnist-tiny optim.lr=0.1 base.batch_size=64 max_concurrent=1
                                                    base.KEY works too; sweep fields are set as they are
  exitbench sweep --resume quick                    continue runs/quick after a crash or Ctrl-C

bundled sweeps: `exitbench list` (bench/configs/NAME.yaml); `exitbench config show NAME k=v` shows the result.
"""


def _overrides(p):
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=0.1")


@command
def _data(sub):
    p = sub.add_parser("data", help="inspect datasets", description="Inspect datasets and their splits.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True, parser_class=type(p))
    q = dsub.add_parser("check", help="split sizes, classes, image shape and where the files were found",
                        description="Build a dataset's train/val/test splits and print their sizes, the class "
                                    "count, the image shape and where the files were found.")
    q.add_argument("dataset", help="dataset name (see `exitbench list`)")
    q.add_argument("options", nargs="*", metavar="KEY=VALUE", help="dataset options, e.g. root=/data val_size=5000")
    q.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    q.add_argument("--json", action="store_true", help="print JSON")

    def run(args):
        from bench.datasets.check import cli_check

        return cli_check(args)

    q.set_defaults(func=run)


@command
def _flops(sub):
    p = sub.add_parser("flops", help="per-exit cumulative MACs and parameters of a backbone",
                       description="Count cumulative multiply-adds (MACs, fvcore convention) and parameters up to "
                                   "and including each exit, earlier heads included.")
    p.add_argument("backbone", help="backbone or preset name (see `exitbench list`)")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="backbone options, e.g. growthRate=8")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: 100 CIFAR-style, 1000 ImageNet)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the preset's)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--counter", choices=["fvcore", "torch"], default="fvcore", help="MAC counter (default fvcore)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--list-cuts", action="store_true",
                   help="sdn and vit backbones: list the layer or block names that backbone.cuts may use (in "
                        "forward order), no count")

    def run(args):
        if args.list_cuts:  # sdn backbones are cut at named layers, vit backbones after encoder blocks
            from bench.backbones import sdn, vit
            from bench.registry import BACKBONES, load_all

            load_all()
            return (vit if BACKBONES.get(args.backbone).factory is vit.vit else sdn).cli_list_cuts(args)
        from bench.flops import cli_flops

        return cli_flops(args)

    p.set_defaults(func=run)


@command
def _budget(sub):
    p = sub.add_parser("budget", help="anytime and budgeted evaluation of a saved logits file",
                       description="Evaluate a logits file (keys val_logits [K,N,C], val_labels [N], test_logits, "
                                   "test_labels, macs [K]; a run's logits.pt holds its readout's outputs there, "
                                   "raw exits as *_raw_logits): anytime table, the 39-budget dynamic protocol, "
                                   "summary.")
    p.add_argument("logits", help="logits .pt file, a run folder (its logits.pt) or a sweep's trial folder (its "
                                  "run/logits.pt)")
    p.add_argument("--confidence", choices=["max_softmax", "entropy", "margin"], default="max_softmax",
                   help="exit confidence: max softmax probability (default, the reference's), negative entropy, "
                        "or top-1 minus top-2 probability")
    p.add_argument("--at-macs", type=float, nargs="+", default=(), metavar="MACS",
                   help="also report the budgeted accuracy at these MACs")
    p.add_argument("--target-acc", type=float, nargs="+", default=(), metavar="ACC",
                   help="also report the MACs at which the budgeted curve first reaches these accuracies (%%)")
    p.add_argument("--auc-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="MACs range of the AUC (default: exit 1's to exit K's MACs)")
    p.add_argument("--json", action="store_true", help="print JSON")

    def run(args):
        from bench.evaluate.cli import cli_budget

        return cli_budget(args)

    p.set_defaults(func=run)


@command
def _evaluate(sub):
    p = sub.add_parser("evaluate", help="run a trained or reference checkpoint on val/test and evaluate it",
                       description="Load a checkpoint (model and the method's readout), collect what the exits "
                                   "report on val and test, and print the anytime and budgeted tables (as "
                                   "`exitbench budget`). An exitbench checkpoint brings its config; a reference "
                                   "project's file (kalviny/MSDNet-PyTorch, LeapLabTHU/L2W-DEN, "
                                   "yangle15/RANet-pytorch, kalviny/IMTA; detected by content) needs backbone=... "
                                   "and data=... overrides.")
    p.add_argument("checkpoint", help="checkpoint file, run folder, or a sweep's trial folder or its run/ folder "
                                      "(the newest checkpoint the trial kept)")
    _overrides(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    def run(args):
        from bench.evaluate.cli import cli_evaluate

        return cli_evaluate(args)

    p.set_defaults(func=run)


@command
def _latency(sub):
    p = sub.add_parser("latency", help="real early-exit inference of a trained run, with measured latency",
                       description="Run a finished run's network with real early exits at each budget's thresholds "
                                   "(batch 1: per-image latency mean/p50/p90; batched: exited samples leave the "
                                   "batch) and every exit alone; print accuracy vs measured ms/image and images/s "
                                   "beside the MACs, check the real-exit accuracy against the simulated one, and "
                                   "store the rows (result.json and the results store's latency table).")
    p.add_argument("run_dir", help="run folder of `exitbench train` (config, checkpoint.pt, logits.pt, result.json), "
                                   "or a finished sweep trial's folder or its run/ folder")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's config)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the batched mode (default 64)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, metavar="P",
                   help="only these budgets p (1..39; default all)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N test images")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's; 1 is steadier on a busy machine)")

    def run(args):
        from bench.evaluate.cli import cli_latency

        return cli_latency(args)

    p.set_defaults(func=run)


@command
def _train(sub):
    p = sub.add_parser("train", help="run one trial and write its run folder",
                       description="Train one trial (config YAML plus dotted overrides); writes config, metrics, "
                                   "checkpoint, logits and the result record to the run folder. One process "
                                   "without Ray; with workers.count=N > 1, N DDP workers on a local Ray (Ray "
                                   "Train), e.g. workers.count=4 workers.gpu=1; batch_size stays the global batch.")
    p.add_argument("config", nargs="?", default=None, help="trial YAML (default: built-in defaults)")
    _overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")

    def run(args):
        from bench.trial.cli import cli_train

        return cli_train(args)

    p.set_defaults(func=run)


@command
def _sweep(sub):
    p = sub.add_parser("sweep", help="run a grid of trials on Ray Tune (default: the bundled sweep)",
                       description="Expand a sweep YAML into trials and run them on Ray Tune; without a file, run "
                                   "the bundled default sweep and its report. Results go to "
                                   "STORAGE_PATH/NAME/store; exit status 1 if any trial failed.",
                       epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="sweep YAML or a bundled sweep's name (default: the bundled default sweep)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="trial fields of the base (epochs=1, optim.lr=0.1; base.epochs=1 alike), sweep fields "
                        "(seeds=[0,1], name=..., max_concurrent=1) or grid axes (grid.optim.lr=[0.1,0.05])")
    p.add_argument("--name", default=None, help="sweep name (folder under storage_path; default: the YAML's name)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--resume", default=None, metavar="NAME",
                   help="continue sweep NAME under storage_path (or a sweep folder): unfinished and failed trials "
                        "resume from their last checkpoints, finished ones are kept; trial fields given with it "
                        "(e.g. optim.lr=0.05) retry the unfinished and failed trials from epoch 0 with those settings")
    p.add_argument("--quiet", action="store_true", help="no live trial table (summary only)")

    def run(args):
        from bench.sweep.cli import cli_sweep

        return cli_sweep(args)

    p.set_defaults(func=run)


@command
def _report(sub):
    p = sub.add_parser("report", help="tables, leaderboard and figures of a sweep",
                       description="Aggregate a sweep's results store over seeds into tables (md/csv/tex), a "
                                   "leaderboard and figures.")
    p.add_argument("sweep_dir", help="sweep folder (holds the results store)")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR/report)")
    p.add_argument("--baseline", default=None,
                   help="what every group is paired with: a method (its default parameters) or a variant as the "
                        "tables name it, e.g. 'uniform (exit_weights=[1, 2, 4])' (default uniform, skipped with a "
                        "note if absent)")
    p.add_argument("--metric", default="auc",
                   help="leaderboard metric, also the one the paired tests use (default auc: budgeted area under "
                        "curve)")
    p.add_argument("--speedup-acc", type=float, default=None, metavar="ACC",
                   help="top-1 (%%) at which to compare MACs (default: the baseline's best budgeted accuracy)")

    def run(args):
        from bench.report.build import cli_report

        return cli_report(args)

    p.set_defaults(func=run)


@command
def _leaderboard(sub):
    p = sub.add_parser("leaderboard", help="merge several sweeps into one leaderboard",
                       description="Merge the results stores of several sweeps into one leaderboard.")
    p.add_argument("sweep_dirs", nargs="+", metavar="DIR", help="sweep folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--metric", default="auc", help="ranking metric, also the one the paired tests use (default auc)")
    p.add_argument("--baseline", default=None,
                   help="method or variant every group is paired with (default uniform, if present)")
    p.add_argument("--published", action="append", default=None, metavar="CSV",
                   help="published numbers to show as cited rows, never in statistics: a CSV file or a folder "
                        "of them (columns method,dataset,backbone,metric,values,epochs,source; "
                        "e.g. results/published); repeatable")

    def run(args):
        from bench.report.build import cli_leaderboard

        return cli_leaderboard(args)

    p.set_defaults(func=run)


@command
def _store(sub):
    p = sub.add_parser("store", help="maintain a sweep's results store",
                       description="Maintain a sweep's results store.")
    ssub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True, parser_class=type(p))
    q = ssub.add_parser("compact", help="fold the per-trial files into one parquet file per table",
                        description="Fold a sweep's per-trial result files into one parquet file per table "
                                    "(SWEEP_DIR/store/compacted/), written atomically; loads and reports then "
                                    "open one file per table plus the per-trial files written since. Safe while "
                                    "trials still write.")
    q.add_argument("sweep_dir", help="sweep folder (holds the results store)")
    q.add_argument("--rebuild", action="store_true",
                   help="ignore the compacted files and rebuild them from the per-trial files (what to do when "
                        "one is reported unreadable)")

    def run(args):
        from bench.results import cli_compact

        return cli_compact(args)

    q.set_defaults(func=run)
