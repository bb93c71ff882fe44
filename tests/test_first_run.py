"""A new user's first run, from a fresh clone (issue 29, items 2-12): evaluation that is quick and says where it
is, a sweep's trial folders taken by evaluate / budget / latency, a sweep file checked whole before any trial,
printed suggestions that work as printed, plugins a sweep remembers, figures that tell variants apart and say
what they draw, a leaderboard of different sweeps that says how they differ, and the small glitches."""

import json
import re
import shlex
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from bench.config import validate_trial
from bench.trial import train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16,
                 "val_size": 0.25},
        "backbone": {"name": "tiny", "widths": [4, 8]}, "epochs": 1, "batch_size": 8, "device": "cpu",
        "progress": False}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitbench: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished `exitbench train` run of the tiny net (one epoch of 32 synthetic images)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train.run(validate_trial(TINY), run_dir)
    return run_dir


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs single-threaded (conftest); the parallel path needs more
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- 2: evaluation: the same bits, in parallel, shown


def test_evaluation_runs_batches_in_parallel_with_the_same_bits(two_threads):
    """Batches spread over single-threaded workers give the bits one batch at a time on torch's thread team gave
    (the loop collect_exits ran before), and the trial loop's val accuracy is the same number."""
    from bench import backbones
    from bench.evaluate.batches import exit_accuracy, map_batches
    from bench.evaluate.logits import collect_exits

    torch.manual_seed(0)
    model = backbones.build({"name": "msdnet-fmnist"}, 10, 1, 28).eval()
    for m in model.modules():  # eval-mode BatchNorm with statistics of its own
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    loader = DataLoader(TensorDataset(torch.randn(80, 1, 28, 28), torch.randint(0, 10, (80,))), batch_size=16)
    with torch.no_grad():
        before = torch.cat([torch.stack(model(x)) for x, _ in loader], 1)
    workers = set()

    def forward(x, y):
        workers.add(threading.current_thread().name)
        return torch.stack(model(x))

    assert torch.equal(torch.cat(list(map_batches(forward, loader, "cpu")), 1), before)
    assert threading.current_thread().name not in workers and len(workers) == 2  # two single-threaded workers
    assert torch.get_num_threads() == 2  # torch's thread count is restored
    assert torch.equal(collect_exits(model, loader, "cpu").raw, before)
    labels = torch.cat([y for _, y in loader])
    assert exit_accuracy(model, loader, "cpu") == [100.0 * float((z.argmax(1) == labels).sum()) / 80 for z in before]


def test_evaluate_shows_progress_on_a_terminal_unless_progress_false(run_cli, trained, monkeypatch):
    from bench.evaluate import batches

    monkeypatch.setattr(batches, "PROGRESS_DELAY_S", 0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # run_cli's captured stderr, as a terminal
    code, out, err = run_cli("evaluate", trained)  # its config says progress=false (as a sweep trial's does)
    assert code == 0 and "anytime (test split)" in out
    assert "evaluating: calibration" in err and "evaluating: test" in err
    code, _, err = run_cli("evaluate", trained, "progress=false")
    assert code == 0 and "evaluating" not in err


# ---------------------------------------------------------------- 4: a sweep's trial folder, as Ray Tune leaves it


@pytest.fixture
def trial_folder(trained, tmp_path):
    """A sweep trial folder laid out as a sweep leaves it (docs/sweeps.md): run/ without a checkpoint, epoch
    checkpoints beside it, the one a resume continued from, Ray Tune's own result.json (JSON lines)."""
    trial = tmp_path / "sweep" / "abcde_00000_uniform-synthetic-tiny-s0"
    shutil.copytree(trained, trial / "run", ignore=shutil.ignore_patterns("checkpoint.pt"))
    metrics = (trained / "metrics.jsonl").read_text()
    for name, body, lines in (("checkpoint_resume", b"not a checkpoint", 0), ("checkpoint_000000", None, 1),
                              ("checkpoint_000001", b"truncated", 0)):
        (trial / name).mkdir()
        (trial / name / "checkpoint.pt").write_bytes(body or (trained / "checkpoint.pt").read_bytes())
        (trial / name / "metrics.jsonl").write_text(metrics * lines)
    (trial / "result.json").write_text('{"epoch": 1}\n{"epoch": 1, "done": true}\n')
    return trial


def test_commands_that_read_a_run_take_a_sweep_trial_folder(run_cli, trial_folder):
    from bench.runfolder import latest_checkpoint
    from bench.runfolder import trial_folder as find_trial

    assert latest_checkpoint(trial_folder) == trial_folder / "checkpoint_000000" / "checkpoint.pt"  # most epochs
    assert find_trial(trial_folder / "run") == trial_folder == find_trial(trial_folder)
    for given in (trial_folder, trial_folder / "run"):
        code, out, err = run_cli("evaluate", given, "progress=false")
        assert code == 0 and "anytime (test split)" in out, err
        code, out, err = run_cli("budget", given)
        assert code == 0 and "budgeted batch" in out, err
    code, out, err = run_cli("latency", trial_folder, "--limit", "4", "--budgets", "1", "--threads", "1")
    assert code == 0 and "check: real-exit accuracy equals" in out, err
    assert json.loads((trial_folder / "run" / "result.json").read_text())["latency"]  # the trial's record


def test_a_trial_folder_without_checkpoints_says_so(run_cli, trial_folder):
    for kept in trial_folder.glob("checkpoint_*"):
        shutil.rmtree(kept)
    code, _, err = run_cli("evaluate", trial_folder)
    assert code == 2 and "kept no checkpoint" in one_line(err)


# ---------------------------------------------------------------- 5: the report section, judged before any trial


def sweep_yaml(tmp_path: Path, name: str, **changes) -> Path:
    raw = {"name": name, "base": {k: v for k, v in TINY.items() if k != "progress"},
           "grid": {"method": [{"name": "uniform"}, {"name": "distill"}]}, "seeds": [0],
           "resources": {"cpu": 1}, "storage_path": str(tmp_path / "runs"), **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("report, message", [
    ({"baseline": "ztw"}, "report.baseline: 'ztw' is not in this sweep (methods: distill, uniform)"),
    ({"baseline": "uniform (exit_weights=[1, 2])"}, "report.baseline: 'uniform (exit_weights=[1, 2])' is not in"),
    ({"metric": "speed"}, "report.metric: unknown metric 'speed'; valid: auc"),
    ({"plots": "yes"}, "report.plots: 'yes' is not true or false"),
    ({"speedup_acc": 150}, "report.speedup_acc: 150 is not a top-1 accuracy"),
    ({"colour": "red"}, "report.colour: unknown report option"),
])
def test_a_bad_report_section_stops_the_sweep_before_it_starts(run_cli, tmp_path, report, message):
    code, out, err = run_cli("sweep", sweep_yaml(tmp_path, "bad", report=report), "--quiet")
    assert code == 2 and out == "" and message in one_line(err)
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_a_report_baseline_may_name_a_variant_as_the_tables_do():
    from bench.config import validate_sweep
    from bench.sweep import cluster

    grid = {"method": [{"name": "uniform"}, {"name": "uniform", "exit_weights": [1, 2]}]}
    for baseline in ("uniform", "uniform (exit_weights=[1, 2])", "uniform (exit_weights=[1.0, 2.0])"):
        cluster.preflight(validate_sweep({"base": TINY, "grid": grid, "report": {"baseline": baseline}}))


# ---------------------------------------------------------------- 6, 7, 3: suggestions that work, remembered plugins


PLUGIN = '''
from bench.registry import METHODS
from methods.uniform import Uniform, UniformParams


class BoomParams(UniformParams):
    fail_at: int = 4


@METHODS.register("boom", BoomParams)
class Boom(Uniform):
    """Uniform until global step `fail_at`, then an error (a trial that fails after its first epoch)."""

    def step(self, x, y, iteration):
        if iteration >= self.params.fail_at:
            raise RuntimeError("boom")
        return super().step(x, y, iteration)
'''


def _suggested(text: str, prefix: str = "exitbench") -> list[list[str]]:
    """The exitbench commands a message or a summary prints (between backticks, or after a colon to the end)."""
    found = re.findall(r"`(exitbench [^`]+)`", text) + re.findall(r": (exitbench .+)$", text, re.M)
    return [shlex.split(c)[1:] for c in found if c.startswith(prefix)]


@pytest.mark.slow
def test_printed_suggestions_work_and_a_plugin_sweep_remembers_its_includes(
        ray_session, run_cli, fresh_registries, tmp_path, monkeypatch):
    """A plugin sweep whose YAML sets storage_path, one trial failing after its first epoch: the summary's
    continue and retry commands, the "already exists" command of a second start, and `--resume` without
    `--include` all work as printed; evaluating the failed trial without --include names the --include. Ray
    Tune's snapshot warning (3 lines per epoch of short trials) is not printed."""
    import logging

    from bench import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", raising=False)
    plugin = tmp_path / "plugin_boom.py"
    plugin.write_text(PLUGIN)
    base = {**{k: v for k, v in TINY.items() if k != "progress"}, "epochs": 3}
    path = sweep_yaml(tmp_path, "three-by-two", base=base, keep_checkpoints=1, storage_path="elsewhere",
                      grid={"method": [{"name": "uniform"}, {"name": "boom"}]})
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ray.tune").addHandler(handler)
    try:
        code, out, err = run_cli("--include", "plugin_boom.py", "sweep", path)  # not --quiet: Tune's logs show
    finally:
        logging.getLogger("ray.tune").removeHandler(handler)
    assert code == 1 and "2 trials: 1 finished, 1 failed" in out, out + err
    assert not [w for w in warnings if "snapshotting" in w]
    jobs = json.loads((tmp_path / "elsewhere" / "three-by-two" / "jobs.json").read_text())
    assert jobs["includes"] == [str(plugin)]
    label = next(j["label"] for j in jobs["jobs"] if j["trial"]["method"]["name"] == "boom")
    assert label == "boom-synthetic-tiny-method=boom-s0"  # the variant's name, not its index on the axis
    continue_, retry = _suggested(out, "exitbench --include")
    assert continue_ == ["--include", str(plugin), "sweep", "--resume", "elsewhere/three-by-two"]
    assert retry == [*continue_, "optim.lr=0.05"]  # half the base's learning rate

    code, _, err = run_cli("--include", "plugin_boom.py", "sweep", path)  # again: the name is taken
    (resume,) = _suggested(one_line(err))
    assert code == 2 and resume == continue_

    # a fresh process: nothing included, no boom
    monkeypatch.setattr(registry, "_included", [])
    fresh_registries["METHODS"]._entries.pop("boom")
    sys.modules.pop("plugin_boom", None)
    failed = next((tmp_path / "elsewhere" / "three-by-two").glob("*_boom-*"))
    code, _, err = run_cli("evaluate", failed)
    assert code == 2 and "unknown method 'boom'" in one_line(err)
    assert _suggested(err) == [["--include", str(plugin), "evaluate", str(failed)]]
    code, out, err = run_cli("sweep", "--resume", "elsewhere/three-by-two", "--quiet")  # no --include: remembered
    assert code == 1 and "2 trials: 1 finished, 1 failed" in out, out + err
    assert "including the sweep's plugins" in err and "boom" in fresh_registries["METHODS"].all_names()
    for args in (resume, retry):
        code, out, err = run_cli(*args, "--quiet")
        assert code == 1 and "2 trials: 1 finished, 1 failed" in out, (args, out + err)


def test_resume_of_a_sweep_whose_plugin_is_gone_says_which(run_cli, fresh_registries, tmp_path):
    sweep_dir = tmp_path / "runs" / "gone"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "jobs.json").write_text(json.dumps({"sweep": {}, "includes": [str(tmp_path / "moved.py")],
                                                     "jobs": []}))
    code, _, err = run_cli("sweep", "--resume", sweep_dir)
    assert code == 2 and f"was started with --include {tmp_path / 'moved.py'}, which does not exist" in one_line(err)


# ---------------------------------------------------------------- 9: trial folders named by the variant


def test_trial_labels_name_component_variants():
    from bench.config import validate_sweep
    from bench.sweep.grid import grid_points

    sweep = validate_sweep({"base": TINY, "seeds": [0], "grid": {"method": [
        {"name": "uniform"}, {"name": "l2w", "epsilon": 0.4}, {"name": "l2w", "epsilon": 0.8, "meta_grad": "jvp"}]}})
    assert [p["label"] for p in grid_points(sweep)] == [
        "uniform-synthetic-tiny-method=uniform-s0", "l2w-synthetic-tiny-epsilon=0.4-s0",
        "l2w-synthetic-tiny-epsilon=0.8,meta_grad=jvp-s0"]


# ---------------------------------------------------------------- 8: figures


def _store(root: Path, runs: list[tuple[str, dict, int]], *, backbone="tiny", epochs=10, macs=(1e6, 2e6, 4e6)):
    """A results store of hand-made finished trials: (method, method options, seed)."""
    from bench.results import ResultRecord, write

    for i, (method, options, seed) in enumerate(runs):
        bump = 2 * (i % 3) + seed
        config = {"name": "t", "data": {"name": "synthetic"}, "backbone": {"name": backbone},
                  "method": {"name": method, **options}, "epochs": epochs, "seed": seed}
        write(ResultRecord(
            trial_id=f"t{i}", config=config, seed=seed, counter="fvcore", versions={"torch_threads": "1"},
            data_info={"test_size": 1000},
            exits=[{"exit": k + 1, "top1": 50 + 10 * k + bump, "top5": 100.0, "macs": m, "params": 1}
                   for k, m in enumerate(macs)],
            budgets=[{"p": p, "test_acc": 55 + 5 * p + bump, "val_acc": 50.0, "expected_macs": macs[0] * (1 + p),
                      "exit_fractions": [0.5, 0.3, 0.2], "thresholds": [0.9, None, None]} for p in (1, 2, 3)]),
            root)
    return root


def test_figures_tell_variants_apart_and_say_what_they_draw(tmp_path, monkeypatch):
    from bench.report import build, figures

    drawn = {}

    def keep(fig, out, stem, note):
        drawn[stem] = (fig, note)
        return []

    monkeypatch.setattr(figures, "save_figure", keep)
    eps = [("uniform", {}, s) for s in (0, 1)] + [("l2w", {"epsilon": e}, s) for e in (0.4, 0.8, 1.2) for s in (0, 1)]
    build.build_report(_store(tmp_path / "ablation", eps), tmp_path / "out", baseline="uniform")
    ax = drawn["budgeted"][0].axes[0]
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert len(colours) == 4 and len(set(map(str, colours.values()))) == 4  # three l2w variants, three colours
    legend = [t.get_text() for t in drawn["differences"][0].axes[0].get_legend().get_texts()]
    assert not any("shaded" in t for t in legend) and all("no CI (n < 3)" in t for t in legend)  # n = 2 pairs
    assert "mean paired difference" in drawn["differences"][0].axes[0].get_legend().get_title().get_text()
    assert "p: the budget of the MSDNet budgeted-batch protocol, 1 (cheapest) to 39" in drawn["exit_fractions"][1]


def test_latency_figure_says_when_it_measured_fewer_images(tmp_path, monkeypatch):
    import pandas as pd

    from bench.report import figures

    notes = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, out, stem, note: notes.append((fig, note)) or [])
    rows = [{"trial_id": "t", "device": "cpu", "policy": "budget", "p": p, "ms_p50": 0.1 * p, "real_acc_b1": 60.0,
             "images": 200} for p in range(1, 40)]
    runs = pd.DataFrame([{"trial_id": "t", "label": "uniform", "seed": 0, "data.test_size": 10000}])
    figures.latency_figure(tmp_path, runs, pd.DataFrame(rows))
    fig, note = notes[0]
    assert note.endswith("; measured on the first 200 of the 10,000 test images (--limit)")
    legend = fig.axes[0].get_legend()
    assert legend.get_bbox_to_anchor().x0 >= fig.axes[0].get_window_extent().x1 - 1  # beside the axes, not on them


# ---------------------------------------------------------------- 10: leaderboards of different sweeps


def test_a_leaderboard_of_different_sweeps_says_how_they_differ(run_cli, tmp_path):
    runs = [(m, {}, s) for m in ("uniform", "distill") for s in (0, 1, 2)]
    small = _store(tmp_path / "small", runs, epochs=20, macs=(5e4, 1e5, 2.016e5))
    large = _store(tmp_path / "large", runs, backbone="msdnet-fmnist", epochs=4, macs=(2.6e6, 7e6, 11.25e6))
    code, out, err = run_cli("leaderboard", small, large, "--out", tmp_path / "board")
    assert code == 0, err
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "Setting: 201.6 K MACs at the last exit (fvcore) · 20 epochs (sweep small)." in board
    assert "Setting: 11.25 M MACs at the last exit (fvcore) · 4 epochs (sweep large)." in board
    assert (tmp_path / "board" / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli("leaderboard", small, _store(tmp_path / "again", runs, epochs=20, macs=(5e4, 1e5, 2.016e5)),
                           "--out", tmp_path / "same")
    assert code == 0 and "Setting" not in (tmp_path / "same" / "leaderboard.md").read_text()


# ---------------------------------------------------------------- 11: small glitches


def test_latency_on_a_missing_gpu_names_the_option(run_cli, trained):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli("latency", trained, "--device", "cuda")
    assert code == 2 and "--device cuda asks for CUDA" in one_line(err) and "use --device cpu" in err
    assert "device=cpu" not in err


def test_budget_of_a_checkpoint_points_to_evaluate_and_that_works(run_cli, trained):
    code, _, err = run_cli("budget", trained / "checkpoint.pt")
    assert code == 2 and "is a checkpoint, not a logits file" in one_line(err)
    (command,) = _suggested(err)
    code, out, err = run_cli(*command, "progress=false")
    assert code == 0 and "anytime (test split)" in out, err


def test_evaluate_reports_macs_in_one_unit_and_no_column_it_does_not_print(run_cli, trained):
    code, out, _ = run_cli("budget", trained)
    assert code == 0 and not re.search(r"\d[eE][+-]\d", out)  # no 1.361e+05 beside 0.1638 M
    assert "first reached at" in out and re.search(r"first reached at (-|\d+\.\d{4} M) MACs", out)
    assert "threshold =" not in out


def test_flops_counts_small_nets_params_exactly(run_cli):
    code, out, _ = run_cli("flops", "tiny", "widths=[4,8]")
    assert code == 0 and "0.00M" not in out
    assert re.search(r"^\s+1\s+\S+M\s+[\d,]+$", out, re.M)


def test_the_documented_defaults_are_the_defaults():
    """docs/configuration.md shows the defaults right after saying `config show` prints them."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    shown = yaml.safe_load(re.search(r"prints every field with its default\).*?```yaml\n(.*?)```", text, re.S)[1])
    defaults = validate_trial({}).model_dump(mode="json")

    def within(part, whole, where):
        for key, value in part.items():
            assert key in whole, where + key
            if isinstance(value, dict):
                within(value, whole[key], f"{where}{key}.")
            else:
                assert value == whole[key], (where + key, value, whole[key])

    within(shown, defaults, "")


# ---------------------------------------------------------------- 12: nothing but torch on the start-up path


def test_list_imports_nothing_heavy_but_torch():
    """`exitbench list` needs the registries; of the heavy packages only torch comes with them (their modules
    define the torch models and losses): no pandas, pyarrow, Ray, plotting, torchvision or fvcore."""
    import subprocess

    code = ("import contextlib, io, sys\nfrom bench.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['list'])\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    loaded = set(done.stdout.split())
    assert done.returncode == 0 and "torch" in loaded, done.stderr
    heavy = {"pandas", "pyarrow", "ray", "matplotlib", "seaborn", "torchvision", "fvcore", "scipy", "sklearn", "PIL"}
    assert loaded & heavy == set()
