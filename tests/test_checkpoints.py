"""Reference checkpoints (MSDNet-PyTorch, L2W-DEN model + WPN, RANet-pytorch, IMTA): formats detected by content,
identical logits after loading, `exitbench evaluate` on each, one-line errors, and `init` for training.

The reference-format state dicts are built here by renaming exitbench's keys to the reference layout, written
independently of bench.backbones.checkpoint (and checked against key lists taken from the reference code)."""

import json
import re
from pathlib import Path

import pytest
import torch

from bench.backbones.checkpoint import init_from, load_reference_checkpoint, parse
from bench.config import validate_trial
from bench.errors import UsageError
from bench.registry import BACKBONES, load_all
from bench.trial import train
from methods.l2w import WeightPredictor

load_all()
FIXTURES = Path(__file__).parent / "fixtures"
# Small MSDNet (3 scales, 3 exits) for the command-line runs; the layout tests use the README presets.
SMALL_MSDNET = {"name": "msdnet", "nBlocks": 3, "nChannels": 4, "growthRate": 2, "base": 1, "step": 1,
                "stepmode": "even"}
SMALL_RANET = {"name": "ranet", "data": "cifar", "nChannels": 4, "growthRate": 4, "step": 1, "stepmode": "even",
               "scale_list": [1, 2], "grFactor": [2, 1], "bnFactor": [2, 1]}


def build(spec, num_classes=10, image_size=32):
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    return BACKBONES.build(spec.pop("name"), spec, num_classes=num_classes, in_channels=3, image_size=image_size)


def randomise(model, seed=0):
    """Random weights and BatchNorm statistics, so every tensor of the state_dict matters for the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=gen) * 0.2)
    return model.eval()


def logits(model, x):
    with torch.no_grad():
        return torch.stack(model.eval()(x))


# --- our names -> reference names, written out here -------------------------------------------------------------


def to_ranet_reference(state, imagenet=False):
    """exitbench RANet keys -> yangle15/RANet-pytorch keys (ConvBasic / ConvBN wrap their Sequential in `.net`)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "first":  # first.i.n.* -> FirstLayer.layers.i.net.n.*; the ImageNet stem is a plain Sequential
            plain = imagenet and parts[1] == "0"
            new = ["FirstLayer", "layers", parts[1], *([] if plain else ["net"]), *parts[2:]]
        elif parts[0] == "heads":  # heads.k.convs.j.n.* -> classifier.k.m.j.net.n.*; heads.k.linear -> same
            new = (["classifier", parts[1], "m", parts[3], "net", *parts[4:]] if parts[2] == "convs"
                   else ["classifier", parts[1], *parts[2:]])
        else:  # flows.a.b.<...> -> scale_flows.a.b.<...> with conv -> conv_normal.net, conv_up/conv_last/trans -> .net
            new = ["scale_flows", *parts[1:3]]
            rest = parts[3:]
            i = 0
            while i < len(rest):
                piece = rest[i]
                if piece == "conv":
                    new += ["conv_normal", "net"]
                elif piece in ("conv_up", "conv_last", "trans"):
                    new += [piece, "net"]
                else:
                    new.append(piece)
                i += 1
        out[".".join(new)] = value
    return out


def to_mlp_tanh(state):
    """exitbench WeightPredictor (net.0, net.2, ..., net.2L) -> L2W-DEN MLP_tanh names."""
    last = max(int(k.split(".")[1]) for k in state)
    out = {}
    for key, value in state.items():
        index, leaf = int(key.split(".")[1]), key.split(".")[2]
        if index == 0:
            out[f"first_hidden_layer.fc.{leaf}"] = value
        elif index == last:
            out[f"output_layer.{leaf}"] = value
        else:
            out[f"rest_hidden_layers.{index // 2 - 1}.fc.{leaf}"] = value
    return out


def prefixed(state, on):
    return {f"module.{k}": v for k, v in state.items()} if on else dict(state)


def reference_file(repo, model, prefix, tmp_path, wpn=None):
    """Write `model` as `repo` saves it; returns the path."""
    state = model.state_dict()
    if repo == "msdnet":  # main.py: model is DataParallel; {'epoch','arch','state_dict','best_prec1','optimizer'}
        obj = {"epoch": 300, "arch": "msdnet", "state_dict": prefixed(state, prefix), "best_prec1": 75.0,
               "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}}
    elif repo == "l2w":  # main_*_DDP.py: model.module.state_dict() and the WPN's; eval loads ['state_dict']
        obj = {"epoch": 300, "arch": "msdnet", "state_dict": prefixed(state, prefix), "best_prec1": 75.0,
               "is_best": False, "optimizer": {"state": {}, "param_groups": []},
               "meta_state_dict": prefixed(to_mlp_tanh(wpn.state_dict()), prefix), "meta_optimizer": {"state": {}}}
    elif repo == "l2w-model-state-dict":
        obj = {"model_state_dict": prefixed(state, prefix)}
    elif repo == "ranet":
        obj = {"epoch": 300, "arch": "RANet", "state_dict": prefixed(to_ranet_reference(state), prefix),
               "best_prec1": 90.0, "optimizer": {"state": {}}}
    elif repo == "imta-ge":  # main_GE.py: msdnet_ge, same names as MSDNet
        obj = {"epoch": 90, "arch": "msdnet_ge", "state_dict": prefixed(state, prefix), "best_acc1": 70.0}
    else:  # imta: IMTA_MSDNet = net (the GE MSDNet) + new Linear heads + ISC modules
        num_classes = model.classifier[0].linear.out_features
        extra = {}
        for k in range(model.num_exits):
            width = 128 if k == 0 else 256
            extra[f"classifier.{k}.weight"], extra[f"classifier.{k}.bias"] = torch.randn(num_classes, width), \
                torch.randn(num_classes)
        for k in range(model.num_exits - 1):
            extra[f"isc_modules.{k}.0.weight"], extra[f"isc_modules.{k}.0.bias"] = torch.randn(128, num_classes), \
                torch.randn(128)
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                extra[f"isc_modules.{k}.1.{leaf}"] = torch.randn(128)
            extra[f"isc_modules.{k}.1.num_batches_tracked"] = torch.tensor(5)
        obj = {"epoch": 30, "arch": "IMTA_MSDNet", "best_acc1": 71.0,
               "state_dict": prefixed({**{f"net.{k}": v for k, v in state.items()}, **extra}, prefix)}
    path = tmp_path / f"{repo}-{prefix}.pth.tar"
    torch.save(obj, path)
    return path


# --- layouts ------------------------------------------------------------------------------------------------------


def test_ranet_renaming_here_gives_the_reference_keys():
    fixture = json.loads((FIXTURES / "ranet-cifar-reference-keys.json").read_text())
    ours = build(fixture["preset"], num_classes=fixture["num_classes"]).state_dict()
    renamed = {k: list(v.shape) for k, v in to_ranet_reference(ours).items()}
    assert renamed == {k: shape for k, shape in fixture["keys"]}


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("repo,backbone", [("msdnet", "msdnet-cifar-budget"), ("l2w", "msdnet-cifar-budget"),
                                           ("l2w-model-state-dict", "msdnet-cifar-budget"),
                                           ("ranet", "ranet-cifar"), ("imta-ge", "msdnet-cifar-budget"),
                                           ("imta", "msdnet-cifar-budget")])
def test_reference_formats_load_with_identical_logits(repo, backbone, prefix, tmp_path):
    source = randomise(build(backbone, 100), seed=1)
    wpn = randomise(WeightPredictor(5, 5, 500, 2), seed=2) if repo == "l2w" else None
    path = reference_file(repo, source, prefix, tmp_path, wpn)
    target = randomise(build(backbone, 100), seed=3)
    load_reference_checkpoint(target, path)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert (logits(target, x) - logits(source, x)).abs().max().item() == 0
    weights = parse(torch.load(path, weights_only=True), str(path))
    if repo == "l2w":
        loaded = WeightPredictor(5, 5, 500, 2)
        loaded.load_state_dict(weights.wpn)
        z = torch.randn(8, 5)
        assert (loaded(z) - wpn(z)).abs().max().item() == 0
    assert (weights.note is not None) == (repo == "imta")


def test_ranet_imagenet_stem_loads():
    spec = {**SMALL_RANET, "data": "imagenet"}
    source = randomise(build(spec, 7, 64), seed=1)
    target = randomise(build(spec, 7, 64), seed=2)
    state = {"module." + k: v for k, v in to_ranet_reference(source.state_dict(), imagenet=True).items()}
    assert "module.FirstLayer.layers.0.0.bias" in state  # the 7x7 stem conv has a bias there
    load_reference_checkpoint(target, {"state_dict": state})
    x = torch.randn(2, 3, 64, 64)
    assert (logits(target, x) - logits(source, x)).abs().max().item() == 0


@pytest.mark.slow
def test_mismatches_are_one_line_naming_keys_and_shapes(tmp_path):
    source = build("msdnet-cifar-budget", 100)
    path = reference_file("msdnet", source, True, tmp_path)
    with pytest.raises(UsageError) as err:  # wrong class count
        load_reference_checkpoint(build("msdnet-cifar-budget", 10), path)
    assert "shape mismatches (classifier.0.linear.weight [100, 128] vs model [10, 128]" in str(err.value)
    with pytest.raises(UsageError) as err:  # wrong preset
        load_reference_checkpoint(build("msdnet-cifar-anytime", 100), path)
    assert re.search(r"\d+ missing keys \(blocks\.", str(err.value)) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="RANet"):  # a RANet file into an MSDNet
        load_reference_checkpoint(build("msdnet-cifar-budget", 10),
                                  reference_file("ranet", build("ranet-cifar"), False, tmp_path))


def test_a_wpn_alone_is_not_a_model(tmp_path):
    torch.save({"module." + k: v for k, v in to_mlp_tanh(WeightPredictor(5, 5).state_dict()).items()},
               tmp_path / "wpn.pth")
    with pytest.raises(UsageError, match="weight prediction network"):
        load_reference_checkpoint(build("msdnet-cifar-budget", 100), tmp_path / "wpn.pth")


# --- exitbench evaluate ----------------------------------------------------------------------------------------------

DATA = ["data=synthetic", "data.num_classes=5", "data.image_size=32", "data.train_size=16", "data.test_size=8",
        "data.val_size=0.5", "batch_size=8", "device=cpu"]


def overrides(spec):
    return [f"backbone.{k}={json.dumps(v)}" for k, v in spec.items()]


@pytest.mark.slow
@pytest.mark.parametrize("repo,spec", [("msdnet", SMALL_MSDNET), ("l2w", SMALL_MSDNET), ("ranet", SMALL_RANET),
                                       ("imta-ge", SMALL_MSDNET), ("imta", SMALL_MSDNET)])
def test_evaluate_runs_on_each_reference_format(repo, spec, run_cli, tmp_path):
    source = randomise(build(spec, 5), seed=1)
    wpn = WeightPredictor(source.num_exits, source.num_exits) if repo == "l2w" else None
    path = reference_file(repo, source, True, tmp_path, wpn)
    code, out, err = run_cli("evaluate", path, *overrides(spec), *DATA, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["anytime"]) == source.num_exits and len(report["budgets"]) == 39
    assert ("ISC" in err) == (repo == "imta")


def test_evaluate_bad_files_are_one_line_exit_2(run_cli, tmp_path):
    cases = {"empty.pt": None, "tensor.pt": torch.zeros(3), "list.pt": [torch.zeros(3)],
             "nomodel.pt": {"epoch": 1, "config": {"backbone": {"name": "tiny"}}, "history": []},
             "reference.pth": {"state_dict": build("tiny").state_dict()}}
    words = {"empty.pt": "empty (0 bytes)", "tensor.pt": "holds a Tensor, not a checkpoint",
             "list.pt": "holds a list, not a checkpoint", "nomodel.pt": "without its 'model' weights",
             "reference.pth": "give the backbone it was trained with"}
    for name, obj in cases.items():
        path = tmp_path / name
        if obj is None:
            path.write_bytes(b"")
        else:
            torch.save(obj, path)
        code, out, err = run_cli("evaluate", path, *DATA)
        assert code == 2 and words[name] in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert not out
    code, _, err = run_cli("evaluate", tmp_path / "reference.pth", "backbone=msdnet-cifar-budget", *DATA)
    assert code == 2 and "missing keys" in err and err.count("\n") == 1


class _NotATensor:
    pass


def test_evaluate_foreign_files_say_what_they_are(run_cli, tmp_path):
    """A text file is not a 'trust' problem, a pickled object is (and the hint names the Python API, the CLI has
    no trust option), and a run's logits.pt points to `exitbench budget`."""
    (tmp_path / "notes.txt").write_text("not a checkpoint at all\n")
    torch.save({"obj": _NotATensor()}, tmp_path / "object.pt")
    torch.save({"val_logits": torch.zeros(2, 3, 4), "test_logits": torch.zeros(2, 3, 4),
                "val_labels": torch.zeros(3, dtype=torch.long), "test_labels": torch.zeros(3, dtype=torch.long),
                "macs": torch.tensor([1.0, 2.0])}, tmp_path / "logits.pt")
    words = {"notes.txt": "not a file written by torch.save", "object.pt": "_NotATensor, which a weights-only read",
             "logits.pt": "is a logits file (val_logits, test_logits), not a checkpoint: `exitbench budget` "
                          "reads logits files"}
    for name, word in words.items():
        code, out, err = run_cli("evaluate", tmp_path / name, *DATA)
        assert code == 2 and not out and word in err and err.count("\n") == 1, (name, err)
        assert "In PyTorch 2.6" not in err and ("trusted=True" in err) == (name == "object.pt"), (name, err)
        assert "state_dict checkpoint" not in err, (name, err)


# --- init: start training from a checkpoint ---------------------------------------------------------------------

TRIAL = {"data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 32, "test_size": 16,
                  "val_size": 0.25},
         "backbone": {"name": "tiny", "widths": [4, 8]}, "epochs": 1, "batch_size": 8, "progress": False,
         "device": "cpu"}


def test_init_loads_exitbench_and_reference_weights_and_the_wpn(tmp_path, capsys):
    first = train.run(validate_trial({**TRIAL, "method": {"name": "l2w", "wpn_hidden": 6}}), tmp_path / "a")
    assert first.status == "finished"
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cfg = validate_trial({**TRIAL, "method": {"name": "l2w", "wpn_hidden": 6}})
    model = build({"name": "tiny", "widths": [4, 8]}, 4, 8)
    from bench.registry import METHODS

    strategy = METHODS.build("l2w", {"wpn_hidden": 6}, model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                             total_steps=1)
    init_from(tmp_path / "a" / "checkpoint.pt", model, strategy)
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, saved["strategy"]["wpn"][k]) for k, v in strategy.wpn.state_dict().items())
    assert "with the WPN" in capsys.readouterr().out
    fresh = build({"name": "tiny", "widths": [4, 8]}, 4, 8)
    init_from(tmp_path / "a", fresh)  # a run folder, as `exitbench evaluate` takes it: its checkpoint.pt
    assert all(torch.equal(v, saved["model"][k]) for k, v in fresh.state_dict().items())
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UsageError, match="is a folder without checkpoint.pt"):
        init_from(tmp_path / "nothing", fresh)
    capsys.readouterr()
    # A reference-format file (L2W-DEN layout, DDP prefixes) through the trial field, then training goes on.
    torch.save({"state_dict": {"module." + k: v for k, v in saved["model"].items()},
                "meta_state_dict": {"module." + k: v for k, v in to_mlp_tanh(saved["strategy"]["wpn"]).items()}},
               tmp_path / "ref.pth")
    raw = {**cfg.model_dump(mode="json"), "init": {"checkpoint": str(tmp_path / "ref.pth"), "strict": True}}
    record = train.run(validate_trial(raw), tmp_path / "b")
    assert record.status == "finished" and "init: L2W-DEN weights" in capsys.readouterr().out


def test_init_mismatch_is_one_line_and_writes_nothing(run_cli, tmp_path):
    torch.save({"state_dict": build("tiny", 4, 8).state_dict()}, tmp_path / "ref.pth")
    (tmp_path / "t.yaml").write_text(json.dumps({**TRIAL, "out_dir": str(tmp_path / "run"),
                                                 "init": {"checkpoint": str(tmp_path / "ref.pth")}}))
    code, _, err = run_cli("train", tmp_path / "t.yaml")
    assert code == 2 and "init.checkpoint" in err and "does not match" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    code, out, err = run_cli("train", tmp_path / "t.yaml", "init.strict=false")
    assert code == 0 and "model keys kept their fresh values" in out, err
