"""Per-exit cost: cumulative multiply-adds (MACs) and parameters up to and including each exit.

What the reference op counter (kalviny/MSDNet-PyTorch op_counter.py) reports and budgeted evaluation uses:
exit k's cost is everything the network computes to produce exits 1..k (stem, stages 1..k and heads 1..k,
earlier heads included): what `Truncated(model, k)` runs, in eval mode with one input image. All K exits
are measured in one run of the whole network with each stem/stage/head call in its own scope (`_Phased`).

Counters (one function each, same interface):
- `fvcore` (default): fvcore's FlopCountAnalysis, one multiply-add = one flop. It counts convs, linears,
  BN (2 per element in eval mode) and LayerNorm (5 per element with its affine) but not ReLU; we add pooling
  as the reference counts it (output elements times kernel area) and attention, which fvcore skips:
  `scaled_dot_product_attention` (QK^T and AV: L S (E + E_v) per batch and head) and the fused
  `_native_multi_head_attention` that nn.MultiheadAttention runs in eval mode (its in-projections, QK^T, AV
  and out-projection). Operators fvcore cannot count fail loudly, except the cost-free ones in `_HARMLESS`.
- `torch`: torch.utils.flop_counter.FlopCounterMode (its flops / 2 = MACs). Counts matmuls, convs and
  attention (the two attention operators above added) only, silently skipping everything else; a stand-in if
  fvcore (last release 2022, traces via TorchScript) breaks.
Parameters up to exit k are those of the modules called up to head k (found with forward hooks); an
nn.MultiheadAttention's include its out_proj, whose weights it uses without calling it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from bench.backbones.contract import MultiExitNet
from bench.errors import UsageError

# Ops with no multiply-adds worth counting (elementwise activations and arithmetic, shape ops) that fvcore
# does not already ignore. Anything else fvcore cannot count is an error: it may be real cost.
_HARMLESS = frozenset({
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::neg", "aten::sigmoid", "aten::sigmoid_", "aten::tanh", "aten::gelu", "aten::silu", "aten::silu_",
    "aten::hardswish", "aten::hardswish_", "aten::hardsigmoid", "aten::leaky_relu", "aten::leaky_relu_",
    "aten::relu6", "aten::hardtanh", "aten::hardtanh_", "aten::elu", "aten::dropout_", "aten::feature_dropout",
    "aten::alpha_dropout", "aten::flatten", "aten::view", "aten::reshape", "aten::expand_as", "aten::pad",
    "aten::numel", "aten::clone", "aten::identity", "aten::contiguous",
})

# Defaults for `exitbench flops` without --image-size / --num-classes: a backbone's params may say with a
# `default_input() -> (image_size, num_classes)` method; otherwise its `data` option (cifar|imagenet|auto)
# picks a row here; backbones with neither (the tiny CNN) get the synthetic CPU setting.
_DEFAULT_INPUT = {"cifar": (32, 100), "imagenet": (224, 1000)}
_NO_DATA_INPUT = (32, 10)
_IMAGENET_FROM = 128  # "auto" picks the ImageNet stem from this size on (as MSDNet's data=auto)


@dataclass(frozen=True)
class ExitCost:
    exit: int  # 1-based
    macs: int  # cumulative multiply-adds up to and including this exit
    params: int  # cumulative parameters up to and including this exit


@dataclass(frozen=True)
class CostReport:
    counter: str
    counter_version: str
    image_size: int
    in_channels: int
    exits: list[ExitCost]

    @property
    def macs(self) -> list[int]:
        return [e.macs for e in self.exits]

    @property
    def params(self) -> list[int]:
        return [e.params for e in self.exits]

    def to_dict(self) -> dict:
        return asdict(self)


def per_exit_cost(model: MultiExitNet, image_size: int, in_channels: int = 3, counter: str = "fvcore") -> CostReport:
    """Cumulative MACs and parameters of exits 1..K of `model` on a 1 x in_channels x S x S input (eval mode).

    The numbers are those of `Truncated(model, k)` for every k, measured in one run of the whole network
    (see `_Phased`) instead of K runs of growing length.
    """
    if counter not in _COUNTERS:
        raise UsageError(f"unknown counter {counter!r}; valid: {', '.join(_COUNTERS)}")
    count_phases, version = _COUNTERS[counter]
    first = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, image_size, image_size, device=first.device if first is not None else "cpu")
    phased = _Phased(model)
    was_training = model.training
    model.eval()
    try:
        with _ModulesCalled(phased) as calls:  # the counter's own run shows which modules each phase calls
            macs = count_phases(phased, x)
    finally:
        model.train(was_training)
    params = calls.cumulative_params(model.num_exits)
    exits = [ExitCost(k + 1, int(m), p) for k, (m, p) in enumerate(zip(macs, params))]
    return CostReport(counter, version(), image_size, in_channels, exits)


def count_macs(module: nn.Module, x: torch.Tensor, counter: str = "fvcore") -> int:
    """MACs of one forward `module(x)` (no per-exit split). Note that fvcore traces: ops whose results reach
    no output are not counted."""
    if counter not in _COUNTERS:
        raise UsageError(f"unknown counter {counter!r}; valid: {', '.join(_COUNTERS)}")
    with torch.no_grad():
        if counter == "fvcore":
            return int(_fvcore_analysis(module, x).total())
        return int(_torch_mode(module, x).get_total_flops() // 2)


class _Call(nn.Module):
    """One call of the network's stem, a stage or a head, as a module of its own (its own trace scope)."""

    def __init__(self, fn: Callable, *args):
        super().__init__()
        self.fn, self.args = fn, args

    def forward(self, state):
        return self.fn(*self.args, state)


class _Phased(nn.Module):
    """The contract's forward without boundaries (stem, then stage k and head k for k = 1..K), with each call
    in a submodule: `stem`, `stages.{k}`, `heads.{k}`. One run then gives every exit's cumulative cost, since
    exit k's is the stem's plus that of stages and heads 1..k, exactly what `Truncated(model, k)` runs.

    It returns the final state too: a TorchScript trace (fvcore) drops every op whose result reaches no
    output, which would hide work the network does at scales no head reads (e.g. MSDNet's finer scales)."""

    def __init__(self, model: MultiExitNet):
        super().__init__()
        self.model = model
        self.stem = _Call(model.stem)
        self.stages = nn.ModuleList(_Call(model.stage, k) for k in range(model.num_exits))
        self.heads = nn.ModuleList(_Call(model.head, k) for k in range(model.num_exits))
        self.phase = 0  # the exit (0-based) the running call belongs to; the stem belongs to the first

    def forward(self, x: torch.Tensor) -> tuple:
        self.phase = 0
        state = self.stem(x)
        logits = []
        for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
            self.phase = k
            state = stage(state)
            logits.append(head(state))
        return (*logits, *tree_leaves(state))


class _ModulesCalled:
    """Records which modules of a `_Phased` network each phase calls (forward pre-hooks)."""

    def __init__(self, phased: _Phased):
        self.phased, self.called, self._hooks = phased, [], []

    def __enter__(self):
        record = lambda m, args: self.called.append((self.phased.phase, m))  # noqa: E731
        self._hooks = [m.register_forward_pre_hook(record) for m in self.phased.model.modules()]
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()

    def cumulative_params(self, num_exits: int) -> list[int]:
        """Parameters of the modules called up to each exit, each parameter counted once."""
        seen: set[int] = set()
        totals, total = [], 0
        for k in range(num_exits):
            for phase, module in self.called:
                if phase != k:
                    continue
                for p in module.parameters(recurse=isinstance(module, nn.MultiheadAttention)):  # its out_proj
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
            totals.append(total)
        return totals


def params_used(module: nn.Module, x: torch.Tensor) -> int:
    """Parameters (counted once each) of the modules that `module(x)` calls."""
    called: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: called.append(m)) for m in module.modules()]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    unique = {id(p): p for m in called for p in m.parameters(recurse=isinstance(m, nn.MultiheadAttention))}
    return sum(p.numel() for p in unique.values())


def _pool_macs(inputs, outputs) -> int:
    # The reference counter's pooling cost: every output element reads kernel_h * kernel_w inputs.
    from fvcore.nn.jit_handles import get_shape

    kernel = inputs[1].toIValue()
    if kernel is None and inputs[1].node().kind() == "prim::ListConstruct":
        kernel = [v.toIValue() for v in inputs[1].node().inputs()]
    kernel = list(kernel) if isinstance(kernel, list | tuple) else [kernel]
    if len(kernel) == 1:
        kernel = kernel * 2
    return math.prod(get_shape(outputs[0])) * math.prod(kernel)


def _attention_macs(q: list[int], k: list[int], v: list[int]) -> int:
    # QK^T and AV over batch (and head) dims: L x S scores of E-wide rows, then L rows of E_v from S values
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _sdpa_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    return _attention_macs(*(get_shape(v) for v in inputs[:3]))


def _native_mha_macs(inputs, outputs) -> int:
    # query [B, L, E], key [B, S, E], value [B, S, E]: in-projections, the heads' attention (E = heads x E/heads),
    # out-projection
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return _native_mha_count(q, k, v)


def _native_mha_count(q: list[int], k: list[int], v: list[int]) -> int:
    b, e = math.prod(q[:-2]), q[-1]
    return b * e * e * (q[-2] + k[-2] + v[-2]) + _attention_macs(q, k, v) + b * q[-2] * e * e


def _torch_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_macs(list(query), list(key), list(value))


def _torch_native_mha(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _native_mha_count(list(query), list(key), list(value))


def _torch_extra() -> dict:
    """Attention operators FlopCounterMode has no formula for (flops, 2 per MAC)."""
    aten = torch.ops.aten
    extra = {aten._native_multi_head_attention: _torch_native_mha}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _torch_attention
    return extra


def _fvcore_analysis(module: nn.Module, x: torch.Tensor):
    """fvcore's analysis of `module(x)`, traced and checked: operators it cannot count that may carry cost
    are an error, not a silent zero."""
    with warnings.catch_warnings():
        # fvcore traces with torch.jit, which torch now flags as deprecated; tracer warnings are about
        # Python values frozen into the trace (the exit count), harmless for counting.
        warnings.filterwarnings("ignore", message=r".*(torch\.jit|TorchScript).*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, (x,))
        analysis.set_op_handle("aten::max_pool2d", _pool_macs, "aten::avg_pool2d", _pool_macs,
                               "aten::scaled_dot_product_attention", _sdpa_macs,
                               "aten::_native_multi_head_attention", _native_mha_macs)
        # We check unsupported operators ourselves below; fvcore's own warnings would be noise.
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        # "caller": an op counts toward every module on the call stack that ran it (our phase modules).
        analysis.ancestor_mode("caller")
        analysis.total()  # runs the trace
    uncounted = {op: n for op, n in analysis.unsupported_ops().items() if op not in _HARMLESS}
    if uncounted:
        ops = ", ".join(f"{op} ({n}x)" for op, n in sorted(uncounted.items()))
        name = type(module.model if isinstance(module, _Phased) else module).__name__
        raise UsageError(f"fvcore cannot count {ops} in {name}; add an op handle in bench/flops.py or use "
                         "--counter torch")
    return analysis


def _fvcore_phases(phased: _Phased, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        analysis = _fvcore_analysis(phased, x)
    by_module = analysis.by_module()
    totals, total = [], by_module["stem"]
    for k in range(len(phased.stages)):
        total += by_module[f"stages.{k}"] + by_module[f"heads.{k}"]
        totals.append(total)
    if totals[-1] != analysis.total():  # every op runs inside some phase; anything else is a bug here
        raise RuntimeError(f"per-exit MACs sum to {totals[-1]}, the whole network has {analysis.total()}")
    return totals


def _torch_mode(module: nn.Module, x: torch.Tensor):
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False, custom_mapping=_torch_extra())
    with mode:
        module(x)
    return mode


def _torch_phases(phased: _Phased, x: torch.Tensor) -> list[int]:
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False, custom_mapping=_torch_extra())
    totals: list[int] = []
    # After head k has run, the running total is exit k's cumulative cost (FlopCounterMode: 2 flops per MAC).
    hooks = [head.register_forward_hook(lambda m, args, out: totals.append(mode.get_total_flops() // 2))
             for head in phased.heads]
    try:
        with mode, torch.no_grad():
            phased(x)
    finally:
        for hook in hooks:
            hook.remove()
    return totals


_COUNTERS: dict[str, tuple[Callable[[_Phased, torch.Tensor], list[int]], Callable[[], str]]] = {
    "fvcore": (_fvcore_phases, lambda: importlib.metadata.version("fvcore")),
    "torch": (_torch_phases, lambda: torch.__version__),
}


def default_input(params) -> tuple[int, int]:
    """(image size, classes) for a backbone's parameters when the command line gives none."""
    if callable(getattr(params, "default_input", None)):
        size, classes = params.default_input()
        return int(size), int(classes)
    data = getattr(params, "data", None)
    if data is None:
        return _NO_DATA_INPUT
    kind = "imagenet" if "imagenet" in str(data).lower() else "cifar"
    return _DEFAULT_INPUT[kind]


def _format(n: float, unit: str) -> str:
    return f"{n / 1e9:.3f}G" if unit == "G" else f"{n / 1e6:.2f}M"


def cli_flops(args) -> int:
    from bench.config import parse_overrides
    from bench.registry import BACKBONES, load_all

    load_all()
    BACKBONES.get(args.backbone)  # unknown names -> the valid ones
    values: dict = {}
    for key, value in parse_overrides(args.options):
        node = values
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    params = BACKBONES.params(args.backbone, values)
    for flag, value in (("--image-size", args.image_size), ("--num-classes", args.num_classes),
                        ("--in-channels", args.in_channels)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    image_size, num_classes = default_input(params)
    if args.image_size is not None:
        image_size = args.image_size
        if getattr(params, "data", None) == "auto":  # the stem follows the size; so do the default classes
            num_classes = _DEFAULT_INPUT["imagenet" if image_size >= _IMAGENET_FROM else "cifar"][1]
    num_classes = args.num_classes if args.num_classes is not None else num_classes
    model = BACKBONES.build(args.backbone, params, num_classes=num_classes, in_channels=args.in_channels,
                            image_size=image_size)
    try:
        report = per_exit_cost(model, image_size, args.in_channels, counter=args.counter)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{args.backbone} cannot run on a {image_size}x{image_size} input with "
                         f"{args.in_channels} channels: {first}") from None

    if args.json:
        out = {"backbone": args.backbone, "counter": report.counter, "counter_version": report.counter_version,
               "image_size": image_size, "in_channels": args.in_channels, "num_classes": num_classes,
               "exits": [{"exit": e.exit, "macs": e.macs, "params": e.params} for e in report.exits]}
        print(json.dumps(out, indent=2))
        return 0
    unit = "G" if report.macs[-1] >= 1e9 else "M"
    print(f"{args.backbone}: {image_size}x{image_size}x{args.in_channels} input, {num_classes} classes, "
          f"counter {report.counter} {report.counter_version} (cumulative, earlier exits included)")
    print(f"{'exit':>4}  {'MACs':>10}  {'params':>12}")
    for e in report.exits:  # params counted exactly: a small net's 0.00M said nothing
        print(f"{e.exit:>4}  {_format(e.macs, unit):>10}  {e.params:>12,}")
    return 0
