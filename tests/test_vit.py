"""`vit`: exits on torchvision's VisionTransformer. The contract (shapes, backward, truncation running only the
blocks it needs, embeddings, head modules), the final exit is torchvision's own model, the exit heads as the
docstring says, per-exit MACs and params against the closed form, torchvision state dicts through `init` and the
local-only `pretrained`, bad input as one line, every strategy for an epoch, resume, and real early exit."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from bench.backbones import build
from bench.backbones import vit as vit_module
from bench.backbones.checkpoint import init_from, local_weights_path
from bench.config import validate_trial
from bench.errors import ConfigError, UsageError
from bench.flops import per_exit_cost
from bench.registry import BACKBONES, METHODS, load_all
from bench.trial import train

load_all()

# A ViT small enough for the engine: 8x8 images, 4x4 patches (4 + 1 tokens), 3 blocks of width 16, exits after
# blocks 0 and 1 and the final one.
SMALL = {"name": "vit", "patch_size": 4, "num_layers": 3, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 24,
         "cuts": [0, 1]}
TRIAL = {"data": {"name": "synthetic", "num_classes": 4, "image_size": 8, "train_size": 48, "test_size": 24,
                  "val_size": 0.25},
         "backbone": SMALL, "epochs": 1, "batch_size": 16, "progress": False, "deterministic": True, "device": "cpu"}


def _model(section, num_classes=10, image_size=32, in_channels=3, seed=0):
    torch.manual_seed(seed)
    return build(section, num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def _trial(tmp_path, **changes):
    raw = json.loads(json.dumps(TRIAL))
    raw["out_dir"] = str(tmp_path / "run")
    raw.update(changes)
    return validate_trial(raw)


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize("section, image_size, exits", [
    ({"name": "vit-mini"}, 32, 6),
    ({"name": "vit-mini"}, 28, 6),
    ({**SMALL, "cuts": ["encoder_layer_1"], "head": "linear", "head_hidden": 8}, 16, 2),
    ({**SMALL, "cuts": None, "dropout": 0.1, "attention_dropout": 0.1}, 16, 3),
])
def test_exits_shapes_backward_truncation(section, image_size, exits, check_contract):
    check_contract(_model(section, image_size=image_size), image_size, exits)


def test_forward_upto_runs_only_the_blocks_it_needs():
    model = _model({**SMALL, "num_layers": 5, "cuts": [1, 3]}, image_size=16).eval()
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: ran.append(i))
    x = torch.randn(2, 3, 16, 16)
    for upto, blocks in ((1, [0, 1]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3, 4])):
        ran.clear()
        with torch.no_grad():
            assert len(model(x, upto=upto)) == upto
        assert ran == blocks, (upto, ran)


@pytest.mark.parametrize("layers, cuts", [(4, [0, 2]), (3, ["encoder_layer_0", "encoder_layer_1"]), (6, None)])
def test_final_exit_is_torchvisions_model(layers, cuts):
    size = 16
    model = _model({**SMALL, "num_layers": layers, "cuts": cuts}, image_size=size, seed=3)
    torch.manual_seed(3)  # the same construction order: the trunk gets the same initial weights
    whole = VisionTransformer(size, 4, layers, 2, 16, 24, num_classes=10)
    with torch.no_grad():  # torchvision initialises its classifier to zero: make the comparison mean something
        whole.heads.head.weight.normal_()
        whole.heads.head.bias.normal_()
        model.final.head.weight.copy_(whole.heads.head.weight)
        model.final.head.bias.copy_(whole.heads.head.bias)
    model.eval(), whole.eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], whole(x), rtol=0, atol=0)
    assert model.num_exits == (layers if cuts is None else len(cuts) + 1)


def test_training_and_inference_kernels_compute_the_same_function():
    model = _model(SMALL, image_size=16).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)  # nn.MultiheadAttention's fast path
    math_kernel = model(x)  # autograd on: the math kernel, differentiable twice
    grads = torch.autograd.grad(math_kernel[1].square().sum(), model.blocks[0].self_attention.in_proj_weight,
                                create_graph=True)
    assert grads[0].requires_grad  # a second derivative exists
    for a, b in zip(fused, math_kernel):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def _tokens(model, x, blocks):
    """The token sequence after `blocks` encoder blocks, computed here from torchvision's own modules."""
    conv, token, pos = model.embed.conv_proj, model.embed.class_token, model.embed.pos_embedding
    seq = conv(x).flatten(2).transpose(1, 2)
    seq = torch.cat([token.expand(len(x), -1, -1), seq], 1) + pos
    for block in list(model.blocks)[:blocks]:
        seq = block(seq)
    return seq


@pytest.mark.parametrize("head, hidden", [("ln_linear", 0), ("linear", 0), ("ln_linear", 8), ("linear", 8)])
def test_exit_heads_read_the_class_token(head, hidden):
    model = _model({**SMALL, "head": head, "head_hidden": hidden}, image_size=16).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        logits, embeddings = model(x, embeddings=True)
        for k, blocks in ((0, 1), (1, 2)):
            cls = _tokens(model, x, blocks)[:, 0]
            mods = list(model.exits[k].children())
            if head == "ln_linear":
                ln = mods[1]
                assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-6
                cls = F.layer_norm(cls, (16,), ln.weight, ln.bias, 1e-6)
            linears = [m for m in mods if isinstance(m, torch.nn.Linear)]
            if hidden:
                cls = F.gelu(F.linear(cls, linears[0].weight, linears[0].bias))
            assert len(linears) == (2 if hidden else 1)
            torch.testing.assert_close(embeddings[k], cls)
            torch.testing.assert_close(logits[k], F.linear(cls, linears[-1].weight, linears[-1].bias))
        # the final exit: the encoder's LayerNorm over the sequence, the class token, torchvision's classifier
        seq = _tokens(model, x, 3)
        final = F.layer_norm(seq, (16,), model.final.ln.weight, model.final.ln.bias, 1e-6)[:, 0]
        torch.testing.assert_close(embeddings[2], final)
        torch.testing.assert_close(logits[2], F.linear(final, model.final.head.weight, model.final.head.bias))


def test_head_modules_hold_only_their_heads_and_disjoint_freezes_the_backbone():
    from bench.config import RegimeConfig
    from bench.trial.regime import Regime

    model = _model(SMALL, image_size=16)
    names = {id(p): n for n, p in model.named_parameters()}
    owned = [sorted(names[id(p)] for p in model.head_module(k).parameters()) for k in range(3)]
    assert owned[0] == ["exits.0.1.bias", "exits.0.1.weight", "exits.0.2.bias", "exits.0.2.weight"]
    assert owned[1] == [n.replace("exits.0", "exits.1") for n in owned[0]]
    assert owned[2] == ["final.head.bias", "final.head.weight", "final.ln.bias", "final.ln.weight"]
    regime = Regime(RegimeConfig(name="disjoint"), epochs=2, steps_per_epoch=1)
    regime.begin_epoch(1, model, torch.optim.SGD(model.parameters(), lr=0.1))  # phase 2: only exits 1..K-1 train
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(owned[0] + owned[1])
    assert all(h.training for h in model.exits) and not any(b.training for b in model.blocks)
    assert not model.final.training and not model.embed.training


# ---------------------------------------------------------------- cost


def _closed_form(sizes, image_size, num_classes, cuts, in_channels=3):
    """Cumulative MACs per exit: patch embedding + per block 4 N D^2 + 2 N^2 D + 2 N D D_mlp + heads (D C each),
    and apart the LayerNorms at 5 per element (fvcore's count: two per block, one on the class token per exit
    head, the final one over the sequence)."""
    p, layers, _, d, mlp = sizes
    n = (image_size // p) ** 2 + 1
    patch = (n - 1) * d * in_channels * p * p
    block = 4 * n * d * d + 2 * n * n * d + 2 * n * d * mlp
    ends = [c + 1 for c in cuts] + [layers]
    bare = [patch + b * block + (k + 1) * d * num_classes for k, b in enumerate(ends)]
    last = len(ends) - 1
    norms = [5 * d * (2 * n * b + min(k + 1, last) + (n if k == last else 0)) for k, b in enumerate(ends)]
    return bare, norms


@pytest.mark.parametrize("preset, cuts, image_size, num_classes", [
    ("vit-mini", None, 28, 10),
    ("vit-mini", [1, 4], 32, 100),
    ("vit-b-16", None, 224, 1000),
    ("vit-b-16", [3, 5, 7, 9], 224, 1000),
])
def test_macs_are_the_closed_form(preset, cuts, image_size, num_classes):
    values = {} if cuts is None else {"cuts": cuts}
    model = BACKBONES.build(preset, values, num_classes=num_classes, in_channels=3, image_size=image_size)
    sizes = {"vit-mini": (4, 6, 4, 64, 128), "vit-b-16": (16, 12, 12, 768, 3072)}[preset]  # torchvision's ViT-B/16
    cut_list = cuts or BACKBONES.preset(preset).values["cuts"]
    bare, norms = _closed_form(sizes, image_size, num_classes, cut_list)
    fvcore = per_exit_cost(model, image_size).macs
    torch_count = per_exit_cost(model, image_size, counter="torch").macs
    assert len(fvcore) == len(cut_list) + 1
    for counted, b, ln in zip(fvcore, bare, norms):  # fvcore counts the LayerNorms too
        assert abs(counted / (b + ln) - 1) < 0.01, (counted, b + ln)
    for counted, b in zip(torch_count, bare):  # torch's counter: matmuls, convs and attention only
        assert abs(counted / b - 1) < 0.01, (counted, b)
    # the check can see attention: QK^T and AV (2 N^2 D per block) are far more than the tolerance
    p, layers, _, d, _ = sizes
    n = (image_size // p) ** 2 + 1
    assert layers * 2 * n * n * d > 0.03 * bare[-1]


class _Attention(torch.nn.Module):
    """F.scaled_dot_product_attention on q [2, 3, 5, 8], k [2, 3, 7, 8], v [2, 3, 7, 4] cut from one input."""

    def forward(self, x):
        return F.scaled_dot_product_attention(x[:, :, :5], x[:, :, 5:], x[:, :, 5:, :4])


class _SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("counter", ["fvcore", "torch"])
def test_attention_operators_are_counted(counter):
    from bench.flops import count_macs

    # QK^T and AV: batch 2 x heads 3 x 5 queries x 7 keys x (8 + 4)
    assert count_macs(_Attention(), torch.randn(2, 3, 12, 8), counter) == 2 * 3 * 5 * 7 * (8 + 4)
    # nn.MultiheadAttention in eval mode (the fused operator): in-projections 3 L E^2, attention 2 L^2 E, out L E^2
    b, n, e = 2, 5, 8
    assert count_macs(_SelfAttention().eval(), torch.randn(b, n, e), counter) == \
        b * (3 * n * e * e + 2 * n * n * e + n * e * e)


def test_params_per_exit_are_the_closed_form():
    model = _model({"name": "vit-mini", "cuts": [2]}, num_classes=10, image_size=32)
    p, d, mlp, c = 4, 64, 128, 10
    stem = 3 * p * p * d + d + d + 65 * d  # conv_proj, class token, position embedding
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    head = 2 * d + d * c + c  # LayerNorm, Linear
    report = per_exit_cost(model, 32)
    assert report.params == [stem + 3 * block + head, stem + 6 * block + 2 * head]
    assert report.params[-1] == sum(t.numel() for t in model.parameters())


def test_sizes_are_torchvisions():
    for arch, (patch, layers, heads, width, mlp) in vit_module.TORCHVISION.items():
        with torch.device("meta"):
            model = torchvision.models.get_model(arch)
        assert (model.patch_size, len(model.encoder.layers), model.hidden_dim, model.mlp_dim) == \
               (patch, layers, width, mlp), arch
        assert model.encoder.layers[0].num_heads == heads, arch


def test_flops_cli_and_list_cuts(run_cli):
    code, out, err = run_cli("flops", "vit-mini", "--json")
    report = json.loads(out)
    assert code == 0 and (report["image_size"], report["num_classes"], len(report["exits"])) == (32, 10, 6), err
    code, out, err = run_cli("flops", "vit-b-16", "cuts=[2, encoder_layer_6]", "--list-cuts", "--json")
    listed = json.loads(out)
    assert code == 0 and listed["valid"] == [f"encoder_layer_{i}" for i in range(11)], err
    assert listed["cuts"] == ["encoder_layer_2", "encoder_layer_6"] and listed["num_layers"] == 12
    code, out, _ = run_cli("flops", "vit", "num_layers=3", "cuts=[1]", "--list-cuts")
    lines = out.strip().splitlines()
    assert code == 0 and "3 blocks" in lines[0] and len(lines) == 3
    assert lines[1].split() == ["0", "encoder_layer_0"] and lines[2].split() == ["*", "1", "encoder_layer_1"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, words", [
    (["vit", "patch_size=5", "--image-size", "28"], ["backbone.patch_size", "28 % 5 = 3", "1, 2, 4, 7, 14, 28"]),
    (["vit-b-16", "--image-size", "40"], ["backbone.patch_size", "16x16", "multiple of 16"]),
    (["vit", "cuts=[5]"], ["backbone.cuts", "5", "valid: 0..4", "encoder_layer_4"]),
    (["vit", "cuts=[encoder_layer_9]"], ["backbone.cuts", "encoder_layer_9"]),
    (["vit", "cuts=[3, 1]"], ["backbone.cuts", "forward order"]),
    (["vit", "cuts=[2, encoder_layer_2]"], ["backbone.cuts", "distinct"]),
    (["vit", "cuts=[]"], ["backbone.cuts"]),
    (["vit", "cuts=[5]", "--list-cuts"], ["backbone.cuts", "valid: 0..4"]),
    (["vit", "num_heads=5"], ["backbone.num_heads", "hidden_dim 64"]),
    (["vit-b-16", "num_layers=6"], ["backbone.num_layers", "vit_b_16 has num_layers 12", "arch=custom"]),
    (["vit", "arch=vit_b_8"], ["backbone.arch", "vit_b_16"]),
    (["vit", "num_layers=1"], ["backbone.num_layers"]),
    (["vit", "head=mlp"], ["backbone.head"]),
    (["vit", "pretrained=true"], ["backbone.pretrained", "custom"]),
])
def test_bad_input_is_one_line_exit_2(args, words, run_cli):
    code, out, err = run_cli("flops", *args)
    assert code == 2 and out == "", out
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err


def test_bad_patch_size_in_a_trial_is_one_line_exit_2(run_cli, tmp_path):
    code, _, err = run_cli("train", f"out_dir={tmp_path / 'run'}", "backbone={name: vit, patch_size: 3}",
                           "data=synthetic", "data.image_size=8", "epochs=1", "device=cpu")
    assert code == 2 and err.count("\n") == 1 and "backbone.patch_size" in err and "8 % 3 = 2" in err, err


# ---------------------------------------------------------------- torchvision weights


def _torchvision_state(seed, image_size=16, num_classes=10, legacy=False):
    torch.manual_seed(seed)
    model = VisionTransformer(image_size, 4, 3, 2, 16, 24, num_classes=num_classes)
    with torch.no_grad():
        for t in model.parameters():
            t.normal_()  # every tensor distinct from a fresh model's (torchvision zeroes the classifier)
    state = model.state_dict()
    if legacy:  # torchvision < 0.13's MLPBlock names, as its hub files keep them
        state = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    return model.eval(), state


def _ours(key):
    """Our ViT's key for a torchvision key, written out here."""
    if key.startswith("encoder.layers.encoder_layer_"):
        i, rest = key.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
        return f"blocks.{i}.{rest.replace('mlp.linear_1', 'mlp.0').replace('mlp.linear_2', 'mlp.3')}"
    fixed = {"class_token": "embed.class_token", "encoder.pos_embedding": "embed.pos_embedding"}
    if key in fixed:
        return fixed[key]
    for theirs, mine in (("conv_proj.", "embed.conv_proj."), ("encoder.ln.", "final.ln."), ("heads.", "final.")):
        if key.startswith(theirs):
            return mine + key.removeprefix(theirs)
    raise AssertionError(key)


@pytest.mark.parametrize("legacy", [False, True])
def test_init_loads_a_torchvision_state_dict(tmp_path, legacy, capsys):
    whole, state = _torchvision_state(1, legacy=legacy)
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    model = _model(SMALL, image_size=16, seed=2)
    exits = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("exits.")}
    init_from(path, model)
    assert "torchvision ViT" in capsys.readouterr().out
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[_ours(key)], value), key
    assert all(torch.equal(loaded[k], v) for k, v in exits.items())  # the exits keep their fresh weights
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[-1], whole(x), rtol=0, atol=0)


def test_init_resizes_the_position_embedding_and_names_mismatches(tmp_path):
    _, state = _torchvision_state(1, image_size=16)  # 4x4 patch grid
    torch.save(state, tmp_path / "vit.pth")
    model = _model(SMALL, image_size=24, seed=2)  # 6x6
    init_from(tmp_path / "vit.pth", model)
    pos = state["encoder.pos_embedding"]
    grid = pos[:, 1:].transpose(1, 2).reshape(1, 16, 4, 4)
    resized = F.interpolate(grid, size=6, mode="bicubic", align_corners=True).reshape(1, 16, 36).transpose(1, 2)
    torch.testing.assert_close(model.embed.pos_embedding, torch.cat([pos[:, :1], resized], 1))

    _, other = _torchvision_state(1, num_classes=100)
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(UsageError, match=r"torchvision ViT checkpoint.*final\.head\.(weight|bias)"):
        init_from(tmp_path / "other.pth", _model(SMALL, image_size=16))
    model = _model(SMALL, image_size=16, seed=4)
    head = model.final.head.weight.clone()
    init_from(tmp_path / "other.pth", model, strict=False)  # another class count: a fresh classifier
    assert torch.equal(model.final.head.weight, head)
    assert torch.equal(model.blocks[2].mlp[3].weight, other["encoder.layers.encoder_layer_2.mlp.3.weight"])


def test_train_with_init_from_torchvision_weights(tmp_path, capsys):
    _, state = _torchvision_state(1, image_size=8, num_classes=4)
    torch.save(state, tmp_path / "vit.pth")
    cfg = _trial(tmp_path, init={"checkpoint": str(tmp_path / "vit.pth")}, regime={"name": "disjoint"}, epochs=2)
    record = train.run(cfg)
    assert record.status == "finished" and "init: torchvision ViT weights" in capsys.readouterr().out


def test_pretrained_loads_only_from_the_local_cache(tmp_path, monkeypatch):
    # vit_b_16 made small (its sizes are data, checked against torchvision above): the weights file stays small
    monkeypatch.setitem(vit_module.TORCHVISION, "vit_b_16", (4, 3, 2, 16, 24))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    section = {"name": "vit", "arch": "vit_b_16", "cuts": [1], "pretrained": True}
    with pytest.raises(ConfigError, match="pretrained.*no local weights"):
        _model(section, image_size=16)
    _, state = _torchvision_state(5, image_size=16, num_classes=1000)
    path = local_weights_path("vit_b_16")
    assert path.startswith(str(tmp_path)) and os.path.basename(path).startswith("vit_b_16")
    os.makedirs(os.path.dirname(path))
    torch.save(state, path)
    model = _model(section, num_classes=1000, image_size=16)
    assert torch.equal(model.blocks[1].self_attention.in_proj_weight,
                       state["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"])
    assert torch.equal(model.final.head.weight, state["heads.head.weight"])
    # another class count, grey images and another size: a fresh classifier and patch projection, the position
    # embedding resized to the 2x2 grid
    model = _model(section, num_classes=10, image_size=8, in_channels=1)
    assert model.final.head.weight.shape == (10, 16) and model.embed.conv_proj.weight.shape == (16, 1, 4, 4)
    assert model.embed.pos_embedding.shape == (1, 5, 16)
    assert torch.equal(model.embed.pos_embedding[:, 0], state["encoder.pos_embedding"][:, 0])
    assert torch.equal(model.blocks[0].mlp[0].weight, state["encoder.layers.encoder_layer_0.mlp.0.weight"])
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ConfigError, match="pretrained.*not vit_b_16's torchvision weights"):
        _model(section, num_classes=10, image_size=16)


# ---------------------------------------------------------------- the engine


def _epochs(name):
    return 2 if name == "ztw" else 1  # ztw fits its ensembles after the first epoch: it needs two


@pytest.mark.parametrize("method", [{"name": name} for name in METHODS.names()]
                         + [{"name": "l2w", "meta_grad": "jvp"}],  # forward-mode AD through the attention
                         ids=lambda m: "-".join(map(str, m.values())))
def test_every_strategy_runs_on_the_small_vit(tmp_path, method):
    record = train.run(_trial(tmp_path, method=method, epochs=_epochs(method["name"])))
    assert record.status == "finished" and len(record.exits) == 3
    assert all(math.isfinite(e["loss"]) for e in record.epochs)


def test_resume_equals_uninterrupted(tmp_path):
    full = train.run(_trial(tmp_path / "a", method={"name": "ztw"}, epochs=3))

    class Crash(Exception):
        pass

    def crash_after_first(row, run_dir):
        if row["epoch"] == 1:
            raise Crash

    cfg = _trial(tmp_path / "b", method={"name": "ztw"}, epochs=3)
    with pytest.raises(Crash):
        train.run(cfg, on_epoch=crash_after_first)
    resumed = train.run(cfg)
    strip = ("time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed.epochs] == \
           [{k: v for k, v in e.items() if k not in strip} for e in full.epochs]
    assert resumed.exits == full.exits and resumed.budgets == full.budgets


def test_real_early_exit_accuracy_equals_simulated(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    train.run(_trial(tmp_path, epochs=2))
    code, out, err = run_cli("latency", run_dir, "--threads", "1", "--budgets", "1", "10", "20", "30", "39",
                             "--batch-size", "8")
    assert code == 0, err
    assert "check: real-exit accuracy equals the simulated one at all 5 budgets" in out, out
    rows = json.loads((run_dir / "result.json").read_text())["latency"]
    assert [r["policy"] for r in rows] == ["exit"] * 3 + ["budget"] * 5
    assert all(r["exits_differing"] == 0 and r["real_acc_b1"] == r["sim_acc"] == r["real_acc_batched"]
               for r in rows if r["policy"] == "budget")



def _ddp_rank(rank, shared, scratch):
    from bench.trial.workers import Workers

    class Keep(Workers):  # every rank's checkpoint state, which only rank 0 writes
        def save(self, path, state):
            self.state = state
            super().save(path, state)

    out = {}
    for name in ("uniform", "ztw"):
        cfg = validate_trial({**TRIAL, "method": {"name": name}, "epochs": 2, "workers": {"count": 2}})
        group = Keep(cfg, "cpu")
        record = train.run(cfg, scratch / name, group=group)
        out[name] = {"status": record.status, "exits": [e["top1"] for e in record.exits],
                     "model": {k: v.clone() for k, v in group.state["model"].items()}}
    return out


@pytest.mark.slow  # two fresh processes: ~15 s
def test_two_ddp_ranks_train_the_small_vit_as_one_trial(tmp_path):
    """Nothing ViT-specific under DDP: two gloo ranks (fresh processes) keep identical weights through a trial."""
    from test_distributed import _two_ranks

    first, second = _two_ranks(_ddp_rank, tmp_path)
    for name in ("uniform", "ztw"):
        assert first[name]["status"] == second[name]["status"] == "finished"
        assert first[name]["exits"] == second[name]["exits"] and len(first[name]["exits"]) == 3
        assert first[name]["model"].keys() == second[name]["model"].keys()
        assert all(torch.equal(v, second[name]["model"][k]) for k, v in first[name]["model"].items())
