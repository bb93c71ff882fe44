"""Bad input to every command: exit status 2, one line on stderr naming what is wrong, no traceback, and
nothing created or changed on disk. Files meant as data (CIFAR batches, torch hub weights, Ray Tune's
tuner.pkl) never run code: a malicious pickle's marker file is never created."""

import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench import results

TINY_TRIAL = ["data=digits", "backbone.widths=[4,8]", "epochs=1", "batch_size=64", "device=cpu", "progress=false"]


class Marker:
    """Unpickling this calls open(path, 'w'): it creates the marker file. Data files must never do that."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def marker_pickle(path: Path, wrap=lambda payload: payload) -> bytes:
    return pickle.dumps(wrap(Marker(path)), protocol=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files the corpus points at, made once: a regular file, torch files of every wrong kind, a real run
    folder (digits, tiny backbone, 1 epoch), a finished sweep with its store, CIFAR folders with bad batches
    and a torch hub cache with a foreign file."""
    from bench.config import load_trial
    from bench.sweep.grid import trial_dirname
    from bench.trial import train

    root = tmp_path_factory.mktemp("world")
    (root / "afile").write_text("a regular file\n")
    (root / "bad.yaml").write_text("epochs: [1,\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "empty.pt").write_bytes(b"")
    # random bytes behind a pickle header of an unknown protocol (torch warns about those while it fails)
    (root / "junk.pt").write_bytes(b"\x80\x58" + np.random.default_rng(0).bytes(254))
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save([1, 2], root / "list.pt")
    torch.save({"val_logits": torch.zeros(2, 4, 3)}, root / "partial_logits.pt")
    torch.save({"val_logits": torch.zeros(2, 4), "val_labels": torch.zeros(4, dtype=torch.long),
                "test_logits": torch.zeros(2, 4, 3), "test_labels": torch.zeros(4, dtype=torch.long),
                "macs": torch.ones(2)}, root / "flat_logits.pt")
    (root / "emptydir").mkdir()

    cfg = load_trial(None, [*TINY_TRIAL, f"out_dir={root / 'run'}"])
    record = train.run(cfg, root / "run")
    for name, state in (("foreign", {"weights": torch.zeros(2)}), ("tensor", torch.zeros(2)),
                        ("logits", torch.load(root / "run" / "logits.pt", weights_only=True))):
        (root / f"ckpt-{name}").mkdir()
        torch.save(state, root / f"ckpt-{name}" / train.CHECKPOINT)

    sweep_dir = root / "runs" / "done"  # a finished sweep of one trial
    sweep = {"name": "done", "base": {"data": {"name": "digits"}, "backbone": {"name": "tiny", "widths": [4, 8]},
                                      "epochs": 1, "device": "cpu"}, "storage_path": str(root / "runs")}
    from bench.config import validate_sweep
    from bench.sweep.grid import expand

    jobs = expand(validate_sweep(sweep), "abcde")
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(validate_sweep(sweep).model_dump(), sort_keys=False))
    (sweep_dir / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    results.write(record.model_copy(update={"trial_id": jobs[0]["key"], "sweep": "done"}), sweep_dir)
    (sweep_dir / trial_dirname(jobs[0])).mkdir()
    (sweep_dir / "tuner.pkl").write_bytes(marker_pickle(root / "MARKER-tuner"))  # planted: never unpickled
    (root / "runs" / "nojobs").mkdir()
    (root / "runs" / "nojobs" / "sweep.yaml").write_text((sweep_dir / "sweep.yaml").read_text())
    (root / "runs" / "badjobs").mkdir()
    (root / "runs" / "badjobs" / "sweep.yaml").write_text((sweep_dir / "sweep.yaml").read_text())
    (root / "runs" / "badjobs" / "jobs.json").write_text('{"jobs": [{"key": 1}')
    (root / "runs" / "badyaml").mkdir()
    (root / "runs" / "badyaml" / "sweep.yaml").write_text("name: [\n")
    (root / "runs" / "badyaml" / "jobs.json").write_text('{"jobs": []}')

    (root / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "s", "base": {"data": {"name": "digits"}, "backbone": {"name": "tiny", "widths": [4, 8]},
                              "epochs": 1, "device": "cpu"},
        "grid": {"optim.lr": [0.1, 0.05]}, "storage_path": str(root / "newruns")}))

    for name, content in (("cifar-evil", marker_pickle(root / "MARKER-cifar",
                                                       lambda m: {"data": np.zeros((1, 3072), np.uint8),
                                                                  "labels": [m]})),
                          ("cifar-objects", pickle.dumps({"data": np.array([None, 1], dtype=object),
                                                          "labels": [0]}, protocol=2)),
                          ("cifar-junk", b"\x80\x02junk")):
        folder = root / name / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / f).write_bytes(content)

    hub = root / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    from bench.backbones.checkpoint import local_weights_path

    os.environ["TORCH_HOME"] = str(root / "torch-home")
    try:
        for arch, content in (("resnet18", os.urandom(512)), ("resnet34", marker_pickle(root / "MARKER-hub")),
                              ("resnet50", None)):
            path = Path(local_weights_path(arch))
            if content is None:
                torch.save([torch.zeros(2)], path)
            else:
                path.write_bytes(content)
    finally:
        del os.environ["TORCH_HOME"]
    return root


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                out[str(path)] = (st.st_size if path.is_file() else -1, st.st_mtime_ns if path.is_file() else 0)
    return out


W = "{w}"  # the module's files
CKPT = f"{W}/run"
CORPUS = [
    # top level, list, config show
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
    (["list", "extra"], "unrecognized arguments: extra"),
    (["config"], "config: the following arguments are required"),
    (["config", "show", f"{W}/nosuch.yaml"], "does not exist"),
    (["config", "show", f"{W}/bad.yaml"], "is not valid YAML (line"),
    (["config", "show", f"{W}/list.yaml"], "must hold a mapping at the top level"),
    (["config", "show", f"{W}/afile"], "must hold a mapping at the top level"),
    (["config", "show", f"{W}/sweep.yaml", "grid.optim.lr=[0.1,0.1]"], "are the same trial"),
    (["config", "show", f"{W}/sweep.yaml", "seeds=[]"], "seeds must name at least one seed"),
    (["config", "show", f"{W}/sweep.yaml", "seeds=[1,1]"], "seeds must be distinct"),
    (["config", "show", f"{W}/sweep.yaml", "keep_checkpoints=0"], "keep_checkpoints"),
    (["config", "show", f"{W}/sweep.yaml", "grid.optim.nope=[1]"], "grid.optim.nope: no such trial field"),
    (["config", "show", f"{W}/sweep.yaml", "grid.seed=[1]"], "grid.seed: seeds are an axis of their own"),
    (["config", "show", f"{W}/sweep.yaml", "search.space.optim.lr=[1,2]"], "search.space"),
    # data check
    (["data", "check", "digits", "val_size=5000"], "only 1348"),
    (["data", "check", "digits", "val_size=1.5"], "neither a count"),
    (["data", "check", "digits", "val_size=0.0001"], "0 val samples"),
    (["data", "check", "digits", "val_size=-1"], "data.val_size"),
    (["data", "check", "digits", "colour=red"], "unknown field 'data.colour'"),
    (["data", "check", "digits", "a.b=1"], "is not a plain KEY=VALUE"),
    (["data", "check", "digits", "novalue"], "not of the form dotted.key=value"),
    (["data", "check", "digits", "--seed", "x"], "--seed: invalid int value"),
    (["data", "check", "mnist-but-not"], "unknown dataset"),
    (["data", "check", "cifar10", f"root={W}/emptydir"], "data.download=true"),
    (["data", "check", "cifar10", f"root={W}/cifar-evil"], "is not a CIFAR python batch"),
    (["data", "check", "cifar10", f"root={W}/cifar-objects"], "is not a CIFAR python batch"),
    (["data", "check", "cifar10", f"root={W}/cifar-junk"], "is not a CIFAR python batch"),
    (["data", "check", "cifar100", f"root={W}/emptydir"], "cifar-100-python"),
    (["data", "check", "imagenet", f"root={W}/emptydir"], "data.root=DIR"),
    (["data", "check", "tiny-imagenet", f"root={W}/emptydir"], "data.root=DIR"),
    (["data", "check", "synthetic", "num_classes=1"], "num_classes"),
    (["data", "check", "synthetic", "image_size=2"], "image_size"),
    (["data", "check"], "the following arguments are required: dataset"),
    # flops
    (["flops", "nosuchnet"], "unknown backbone"),
    (["flops", "tiny", "widths=oops"], "widths"),
    (["flops", "tiny", "nosuch=1"], "unknown field"),
    (["flops", "tiny", "--counter", "abacus"], "--counter: invalid choice"),
    (["flops", "tiny", "--num-classes", "x"], "--num-classes: invalid int value"),
    (["flops", "sdn", "arch=nosuchnet"], "backbone.arch: unknown 'nosuchnet'"),
    (["flops", "sdn", "arch=cifar_resnet20", "pretrained=true"], "has no pretrained weights"),
    (["flops", "sdn-resnet18", "pretrained=true"], "is not resnet18's torchvision weights"),
    (["flops", "sdn", "arch=resnet34", "pretrained=true"], "is not resnet34's torchvision weights"),
    (["flops", "sdn", "arch=resnet50", "pretrained=true"], "holds a list, not a state dict"),
    (["flops", "sdn", "arch=resnet101", "pretrained=true"], "no local weights for resnet101"),
    # budget
    (["budget", f"{W}/nosuch.pt"], "nosuch.pt"),
    (["budget", f"{W}/empty.pt"], "empty.pt"),
    (["budget", f"{W}/junk.pt"], "junk.pt"),
    (["budget", f"{W}/tensor.pt"], "holds a Tensor"),
    (["budget", f"{W}/list.pt"], "holds a list"),
    (["budget", f"{W}/partial_logits.pt"], "missing key(s)"),
    (["budget", f"{W}/flat_logits.pt"], "val_logits must be a floating-point [K, N, C] tensor"),
    (["budget", f"{W}/emptydir"], "emptydir"),
    (["budget", f"{CKPT}/logits.pt", "--confidence", "vibes"], "--confidence: invalid choice"),
    (["budget", f"{CKPT}/logits.pt", "--at-macs", "x"], "--at-macs: invalid float value"),
    (["budget", f"{CKPT}/logits.pt", "--auc-range", "1"], "--auc-range: expected 2 arguments"),
    (["budget"], "the following arguments are required: logits"),
    # evaluate (its loading of bad files is covered with cli_evaluate's own tests)
    (["evaluate", f"{W}/nosuch.pt"], "no checkpoint at"),
    (["evaluate", f"{W}/emptydir"], "no checkpoint at"),
    (["evaluate"], "the following arguments are required: checkpoint"),
    # train
    (["train", f"{W}/nosuch.yaml"], "does not exist"),
    (["train", f"{W}/bad.yaml"], "is not valid YAML"),
    (["train", f"{W}/list.yaml"], "must hold a mapping"),
    (["train", "epochs=0"], "epochs"),
    (["train", "batch_size=0"], "batch_size"),
    (["train", "seed=-1"], "seed"),
    (["train", "optim.lr=0"], "optim.lr"),
    (["train", "optim.momentum=1"], "optim.momentum"),
    (["train", "optim.name=adam"], "optim.name"),
    (["train", "schedule.name=poly"], "schedule.name"),
    (["train", "schedule.milestones=[0.9,0.5]"], "milestones must be increasing"),
    (["train", "device=tpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["train", "device=cuda:x"], "device must be auto"),
    (["train", "method=nope"], "unknown method 'nope'"),
    (["train", "method.nosuch=1"], "unknown field 'method.nosuch'"),
    (["train", "backbone=nope"], "unknown backbone 'nope'"),
    (["train", "backbone.nosuch=1"], "unknown field 'backbone.nosuch'"),
    (["train", "data=nope"], "unknown dataset 'nope'"),
    (["train", "data.nosuch=1"], "unknown field 'data.nosuch'"),
    (["train", "nosuch=1"], "nosuch"),
    (["train", "optim..lr=1"], "not of the form dotted.key=value"),
    (["train", "=1"], "not of the form dotted.key=value"),
    (["train", *TINY_TRIAL, "data.val_size=5000", "out_dir=new"], "only 1348"),
    (["train", *TINY_TRIAL, "data=cifar10", f"data.root={W}/emptydir", "out_dir=new"], "data.download=true"),
    (["train", *TINY_TRIAL, "data=cifar10", f"data.root={W}/cifar-evil", "out_dir=new"],
     "is not a CIFAR python batch"),
    (["train", *TINY_TRIAL, f"out_dir={W}/afile/run"], "afile is a file, not a folder"),
    (["train", *TINY_TRIAL, f"out_dir={W}/afile"], "afile is a file, not a folder"),
    (["train", *TINY_TRIAL, f"out_dir={CKPT}"], "already holds a checkpoint; pass --resume"),
    (["train", *TINY_TRIAL, f"out_dir={W}/emptydir", "--resume"], "--resume: no checkpoint in"),
    (["train", *TINY_TRIAL, f"out_dir={W}/ckpt-foreign", "--resume"],
     "is not a training checkpoint of exitbench (a dict without"),
    (["train", *TINY_TRIAL, f"out_dir={W}/ckpt-tensor", "--resume"],
     "is not a training checkpoint of exitbench (a Tensor)"),
    (["train", *TINY_TRIAL, f"out_dir={W}/ckpt-logits", "--resume"], "is not a training checkpoint of exitbench"),
    (["train", *TINY_TRIAL, "backbone.widths=[4,16]", f"out_dir={CKPT}", "--resume"],
     "does not fit the configured backbone: 'stages.1"),
    (["train", *TINY_TRIAL, "method=distill", f"out_dir={CKPT}", "--resume"], "was written by method 'uniform'"),
    (["train", "--resume", "--resume2"], "unrecognized arguments: --resume2"),
    # sweep
    (["sweep", f"{W}/nosuch.yaml"], "does not exist"),
    (["sweep", f"{W}/bad.yaml"], "is not valid YAML"),
    (["sweep", f"{W}/sweep.yaml", "grid.optim.lr=[0.1,0.1]"], "are the same trial"),
    (["sweep", f"{W}/sweep.yaml", "grid.optim.lr=[]"], "grid.optim.lr: empty axis"),
    (["sweep", f"{W}/sweep.yaml", "base.data.val_size=5000"], "only 1348"),
    (["sweep", f"{W}/sweep.yaml", "resources.cpu=1.5"], "fractions are allowed only below 1"),
    (["sweep", f"{W}/sweep.yaml", "resources.cpu=512"], "resources per trial (cpu=512, gpu=0) are more than"),
    (["sweep", f"{W}/sweep.yaml", "resources.gpu=-1"], "resources.gpu"),
    (["sweep", f"{W}/sweep.yaml", "base.device=cuda"], "device=cuda needs resources.gpu > 0"),
    (["sweep", f"{W}/sweep.yaml", "name=a/b"], "sweep name 'a/b'"),
    (["sweep", f"{W}/sweep.yaml", "search.scheduler=asha", "search.metric=accuracy"], "search.metric='accuracy'"),
    (["sweep", f"{W}/sweep.yaml", "search.scheduler=hyperband"], "search.scheduler"),
    (["sweep", f"{W}/sweep.yaml", "report.colour=1"], "report.colour: unknown report option"),
    (["sweep", f"{W}/sweep.yaml", f"storage_path={W}/afile/runs"], "afile is a file, not a folder"),
    (["sweep", f"{W}/sweep.yaml", f"storage_path={W}/afile"], "afile is a file, not a folder"),
    (["sweep", f"{W}/sweep.yaml", "--name", "done", f"storage_path={W}/runs"], "already exists"),
    (["sweep", f"{W}/sweep.yaml", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
    (["sweep", "--resume", "nosuch", f"storage_path={W}/runs"], "--resume nosuch: no sweep there"),
    (["sweep", "--resume", f"{W}/emptydir"], "no sweep there"),
    (["sweep", "--resume", "done", "--name", "other"], "--name other and --resume done disagree"),
    (["sweep", "--resume", f"{W}/runs/nojobs"], "has no jobs.json"),
    (["sweep", "--resume", f"{W}/runs/badjobs"], "is not a job list written by exitbench"),
    (["sweep", "--resume", f"{W}/runs/badyaml"], "is not a sweep written by exitbench"),
    (["sweep", "--resume", f"{W}/runs/done", "grid.optim.lr=[1]"], "only trial fields"),
    (["sweep", "--resume", f"{W}/runs/done", "seeds=[3]"], "only trial fields"),
    (["sweep", "--resume", f"{W}/runs/done", "optim.lr=0.05"], "nothing to retry"),
    # latency
    (["latency", f"{W}/nosuch"], "does not exist; give the out_dir"),
    (["latency", f"{W}/emptydir"], "emptydir"),
    (["latency", CKPT, "--batch-size", "0"], "--batch-size"),
    (["latency", CKPT, "--budgets", "40"], "--budgets"),
    (["latency", CKPT, "--limit", "x"], "--limit: invalid int value"),
    (["latency", CKPT, "--device", "tpu"], "tpu"),
    (["latency", CKPT, "extra=1"], "unrecognized arguments: extra=1"),
    # report, leaderboard
    (["store"], "store: the following arguments are required: SUBCOMMAND"),
    (["store", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["store", "compact"], "the following arguments are required"),
    (["store", "compact", f"{W}/nosuch"], "no results store in"),
    (["store", "compact", f"{W}/afile"], "no results store in"),
    (["store", "compact", f"{W}/emptydir"], "no results store in"),
    (["store", "compact", f"{W}/runs/done", "--bogus"], "unrecognized arguments: --bogus"),
    (["report", f"{W}/nosuch"], "/nosuch' does not exist"),
    (["report", f"{W}/emptydir"], "no results store"),
    (["report", f"{W}/runs/done", "--metric", "vibes"], "unknown --metric 'vibes'"),
    (["report", f"{W}/runs/done", "--baseline", "nope"], "--baseline 'nope' is not"),
    (["report", f"{W}/runs/done", "--out", f"{W}/afile/rep"], "afile is a file, not a folder"),
    (["report", f"{W}/runs/done", "--out", f"{W}/afile"], "afile is a file, not a folder"),
    (["report", f"{W}/runs/done", "--speedup-acc", "x"], "--speedup-acc: invalid float value"),
    (["leaderboard", f"{W}/runs/done"], "the following arguments are required: --out"),
    (["leaderboard", f"{W}/runs/done", "--out", f"{W}/afile/lb"], "afile is a file, not a folder"),
    (["leaderboard", f"{W}/nosuch", "--out", "lb"], "/nosuch' does not exist"),
    (["leaderboard", f"{W}/runs/done", "--out", "lb", "--metric", "vibes"], "unknown --metric 'vibes'"),
]


@pytest.mark.parametrize("args, message", CORPUS, ids=[" ".join(a)[:60] for a, _ in CORPUS])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, run_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/, runs/train) would land here
    monkeypatch.setenv("TORCH_HOME", str(world / "torch-home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(world / "torch-home" / "hub"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = snapshot(world, tmp_path)
    with warnings.catch_warnings(record=True) as caught:  # what Python would print to the user's stderr
        warnings.simplefilter("always")
        code, out, err = run_cli(*[a.replace(W, str(world)) for a in args])
    shown = [w for w in caught if issubclass(w.category, (UserWarning, FutureWarning, RuntimeWarning))]
    assert not shown, [str(w.message) for w in shown]
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("exitbench: error: "), err
    assert message.replace(W, str(world)) in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert snapshot(world, tmp_path) == before, "the command created or changed files"
    assert not list(world.glob("MARKER-*")), "a data file ran code"


def test_resume_never_unpickles_tune_state(world, run_cli):
    """The finished sweep holds a planted tuner.pkl (its unpickling would create a marker file); resuming it
    reads exitbench's own state only, finds nothing to do and never loads the pickle (nor starts Ray)."""
    code, out, err = run_cli("sweep", "--resume", str(world / "runs" / "done"), "--quiet")
    assert code == 0 and "sweep: 1 trials: 1 finished, 0 failed" in out, out + err
    assert not list(world.glob("MARKER-*")) and not (world / "runs" / "done" / "driver.lock").exists()


def test_corpus_is_large_and_covers_every_command():
    from bench.cli.main import build_parser

    commands = {a[0] for a, _ in CORPUS}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) <= commands
    assert len(CORPUS) >= 100


@pytest.mark.slow
def test_stderr_of_a_real_process_is_one_line(world, tmp_path):
    """The same from outside: a fresh interpreter (logging, warnings and Ray's own output included)."""
    env = dict(os.environ, TORCH_HOME=str(world / "torch-home"), RAY_ADDRESS="", PYTHONWARNINGS="default")
    for args in (["train", f"out_dir={world}/afile/run", "epochs=1"],
                 ["sweep", f"{world}/sweep.yaml", f"storage_path={world}/afile/runs"],
                 ["flops", "sdn-resnet18", "pretrained=true"],
                 ["data", "check", "cifar10", f"root={world}/cifar-evil"]):
        done = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=300)
        assert done.returncode == 2 and done.stdout == "", (args, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not list(world.glob("MARKER-*")) and not list(tmp_path.iterdir())


def test_malicious_cifar_batch_never_runs_and_real_layouts_load(tmp_path):
    """A CIFAR batch whose unpickling would call open(): refused before the call. A batch as the original
    Python 2 pickles write it (numpy.core names, latin-1 strings) loads."""
    from bench.datasets import load_cifar_batch

    marker = tmp_path / "MARKER"
    for payload in (marker_pickle(marker), marker_pickle(marker, lambda m: {"data": m}),
                    pickle.dumps({"labels": [Marker(marker)]}, protocol=4)):
        with pytest.raises(pickle.UnpicklingError, match="is not part of a CIFAR batch"):
            load_cifar_batch(payload)
        assert not marker.exists()
    pickle.loads(marker_pickle(tmp_path / "LIVE")).close()  # the payload works: an ordinary unpickler runs it
    assert (tmp_path / "LIVE").exists()
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    py2 = pickle.dumps({"data": data, "labels": [3, 7], "batch_label": b"training batch 1 of 5",
                        "filenames": [b"a.png", b"b.png"]}, protocol=2)
    py2 = py2.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy < 2's module name
    batch = load_cifar_batch(py2)
    np.testing.assert_array_equal(batch["data"], data)
    assert batch["labels"] == [3, 7] and batch["filenames"] == [b"a.png", b"b.png"]


def test_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision

    from bench.datasets import make_splits
    from bench.errors import UsageError
    from bench.registry import DATASETS

    def failing(root, train=True, download=False):
        Path(root, "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz.part").write_bytes(b"12")
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing)
    assert "cifar10" in DATASETS
    with pytest.raises(UsageError, match="download into .* failed: network unreachable"):
        make_splits({"name": "cifar10", "root": str(tmp_path / "data" / "cifar"), "download": True})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # a folder the user made stays, and so does what was in it
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(UsageError):
        make_splits({"name": "cifar10", "root": str(tmp_path / "mine"), "download": True})
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["cifar-10-batches-py",
                                                                     "cifar-10-python.tar.gz.part", "keep.txt"]


def test_diverged_train_is_one_line_on_stderr(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY_TRIAL, "data=synthetic", "data.noise=.inf", f"out_dir={tmp_path / 'r'}")
    assert code == 1 and "diverged" not in out
    assert err.count("\n") == 1 and err.startswith("exitbench: training diverged: loss is nan at epoch 1")


def test_a_second_driver_is_refused_and_a_dead_ones_lock_is_taken_over(world, tmp_path):
    """The lock itself (the slow test in test_tune kills a real driver): a live owner on this host or any owner
    on another host refuses; a dead owner's lock is taken over and released."""
    from bench.errors import UsageError
    from bench.sweep.lock import DriverLock

    lock_file = tmp_path / "driver.lock"
    me = DriverLock._me()  # pid, host, start time
    lock_file.write_text(json.dumps({**me, "ray": []}))
    with pytest.raises(UsageError, match=f"in use by another driver \\(pid {me['pid']} on this host\\)"):
        DriverLock(str(tmp_path)).acquire()
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0.0, "ray": []}))
    with pytest.raises(UsageError, match="locked by a driver on host elsewhere"):
        DriverLock(str(tmp_path)).acquire()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a dead driver (same pid, other start time) whose "Ray process" still runs: it is ended
        import psutil

        started = psutil.Process(sleeper.pid).create_time()
        lock_file.write_text(json.dumps({**me, "started": 1.0,
                                         "ray": [{"pid": sleeper.pid, "started": started},
                                                 {"pid": me["pid"], "started": 2.0}]}))  # a reused pid: spared
        lock = DriverLock(str(tmp_path))
        t0 = time.time()
        lock.acquire()
        sleeper.wait(timeout=10)  # ended (psutil reaped it, so its status reads 0), long before its 60 s
        assert time.time() - t0 < 10
        assert json.loads(lock_file.read_text())["pid"] == me["pid"] and lock.owned
        lock.release()
        assert not lock_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
