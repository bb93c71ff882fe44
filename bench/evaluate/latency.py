"""Real early-exit inference and its measured latency (`exitbench latency RUN_DIR`, bench.evaluate.cli).

Every budgeted number elsewhere is simulated from saved logits and MACs. Here the trained network runs with
real early exits at each budget's thresholds (those fitted on the calibration split and stored in
result.json): stage k and head k run, the exit's confidence is compared with T_k, and a sample that exits
costs nothing more. Two modes:
- batch 1: one image at a time; per-image latency (mean, p50, p90 over the images);
- batched: batches of B; samples that exit leave the batch (the state is indexed down to the rest), the
  others continue, so a batch costs what its slowest sample needs.
Beside them: the static rows (every image through exit k, a plain truncated forward), the MACs-based
numbers, and a check that the real-exit accuracy equals the simulated budgeted accuracy from logits.pt at
the same thresholds (any difference is reported with the number of images that left at another exit:
e.g. a model evaluated on another device than the one that wrote logits.pt).

What exit k reports goes through the method's readout (bench.readout: identity, or e.g. Boosted's sum of
earlier exits): `readout.exit(k, raw_k, carry)` is called as head k runs, and the carry shrinks with the batch.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.backbones.contract import MultiExitNet, map_state
from bench.evaluate.protocol import exit_scores, probabilities
from bench.readout import Readout, readout_outputs

WARMUP = 10  # images (batch 1) or batches (batched) run before timing: first calls allocate and pick kernels


def scores(logits: torch.Tensor, confidence: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, prediction) per row, with bench.evaluate.protocol's float32 arithmetic so they match its bits."""
    x = logits.float()
    n, C = x.shape
    probs, work = torch.empty_like(x), torch.empty_like(x)
    conf, top = x.new_empty(n), x.new_empty(n)
    probabilities(x, confidence, probs, conf, top, work)
    return conf, probs.argmax(1)  # argmax: the first index among equal probabilities, as the reference


@torch.no_grad()
def early_exit(model: MultiExitNet, x: torch.Tensor, thresholds: Sequence[float], confidence: str = "max_softmax",
               readout: Readout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `x` with real early exits: a sample leaves at the first k with confidence >= thresholds[k] (the last
    exit takes the rest) of what exit k reports (through `readout`, the identity when None). Returns
    (prediction, exit index) per sample. Model and readout in eval mode."""
    n, K = x.shape[0], model.num_exits
    pred = torch.empty(n, dtype=torch.long, device=x.device)
    exit_of = torch.empty(n, dtype=torch.long, device=x.device)
    alive = torch.arange(n, device=x.device)
    state, carry = model.stem(x), None
    for k in range(K):
        state = model.stage(k, state)
        out = model.head(k, state)
        if readout is not None:
            out, carry = readout.exit(k, out, carry)
        if k < K - 1 and thresholds[k] == math.inf:
            continue  # nobody exits here: skip the confidence
        conf, guess = scores(out, confidence)
        leave = conf >= thresholds[k] if k < K - 1 else torch.ones_like(conf, dtype=torch.bool)
        pred[alive[leave]], exit_of[alive[leave]] = guess[leave], k
        stay = ~leave
        if not bool(stay.any()):
            break
        if not bool(leave.any()):
            continue
        alive = alive[stay]
        state, carry = (map_state(lambda t, keep=stay: t[keep], s) for s in (state, carry))
    return pred, exit_of


@torch.no_grad()
def static_exit(model: MultiExitNet, x: torch.Tensor, k: int, confidence: str = "max_softmax",
                readout: Readout | None = None) -> torch.Tensor:
    """Every sample through exits 1..k (earlier heads included, as MACs count them): prediction at exit k."""
    outputs = model(x, upto=k + 1)
    if readout is not None:
        outputs = readout_outputs(readout, outputs)
    return scores(outputs[k], confidence)[1]


def simulated(logits: torch.Tensor, labels: torch.Tensor, thresholds: Sequence[float],
              confidence: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test sample from saved logits [K, N, C]: (correct, exit index) under the same rule."""
    conf, top1, _ = exit_scores(logits, labels, confidence)
    K = conf.shape[0]
    meets = conf >= torch.tensor(list(thresholds), dtype=torch.float32)[:, None]
    meets[K - 1] = True
    exit_of = meets.byte().argmax(0)  # the first exit whose threshold is met
    return top1[exit_of, torch.arange(conf.shape[1])], exit_of


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name} ({torch.get_num_threads()} threads)"


def _percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def measure(model: MultiExitNet, images: torch.Tensor, labels: torch.Tensor, policy: Callable, device: torch.device,
            batch_size: int) -> dict[str, Any]:
    """Time `policy(x) -> (prediction, exit index)` at batch 1 (per image) and at `batch_size`."""
    images, labels = images.to(device), labels.to(device)
    for i in range(min(WARMUP, len(images))):
        policy(images[i:i + 1])
    per_image, pred1, exit1 = [], [], []
    for i in range(len(images)):
        x = images[i:i + 1]
        _sync(device)
        t0 = time.perf_counter()
        p, e = policy(x)
        _sync(device)
        per_image.append((time.perf_counter() - t0) * 1e3)
        pred1.append(p)
        exit1.append(e)
    pred1, exit1 = torch.cat(pred1), torch.cat(exit1)
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    for x in batches[:WARMUP]:
        policy(x)
    predb, exitb, total = [], [], 0.0
    for x in batches:
        _sync(device)
        t0 = time.perf_counter()
        p, e = policy(x)
        _sync(device)
        total += time.perf_counter() - t0
        predb.append(p)
        exitb.append(e)
    predb, exitb = torch.cat(predb), torch.cat(exitb)
    n = len(images)
    return {
        "acc_b1": 100.0 * float((pred1 == labels).sum()) / n,
        "acc_batched": 100.0 * float((predb == labels).sum()) / n,
        "exit_b1": exit1.cpu(), "exit_batched": exitb.cpu(), "correct_b1": (pred1 == labels).cpu(),
        "ms_mean": sum(per_image) / n, "ms_p50": _percentile(per_image, 0.5), "ms_p90": _percentile(per_image, 0.9),
        "batched_ms_per_image": 1e3 * total / n, "batched_images_per_s": n / total if total > 0 else math.inf,
    }


def _thresholds(row: Sequence[float | None]) -> list[float]:
    """result.json's thresholds (null = never, at the last exit always) -> floats."""
    K = len(row)
    return [(-math.inf if k == K - 1 else math.inf) if t is None else float(t) for k, t in enumerate(row)]


def run_latency(model: MultiExitNet, images: torch.Tensor, labels: torch.Tensor, saved: dict[str, torch.Tensor],
                budgets: list[dict], device: torch.device, batch_size: int, confidence: str,
                readout: Readout | None = None) -> list[dict[str, Any]]:
    """One row per exit alone (static) and per budget: measured latency, real-exit and simulated accuracy
    (`saved`: logits.pt's test_logits, test_labels and macs, i.e. what the exits report, readout included)."""
    model = model.eval().to(device)
    if readout is not None:
        readout = readout.eval().to(device)
    macs = saved["macs"].double()
    K, n = model.num_exits, len(images)
    name = device_name(device)
    rows = []
    common = {"device": name, "batch_size": batch_size, "images": n, "confidence": confidence}
    sim_top1 = None
    for k in range(K):
        got = measure(model, images, labels, lambda x, k=k: (static_exit(model, x, k, confidence, readout),
                                                             torch.full((len(x),), k, device=x.device)),
                      device, batch_size)
        if sim_top1 is None:
            sim_top1 = exit_scores(saved["test_logits"], saved["test_labels"], confidence).top1
        sim_acc = 100.0 * float(sim_top1[k].sum()) / n
        rows.append(_row(common, "exit", None, k + 1, got, sim_acc, 0, float(macs[k]), float(macs[k])))
    for b in budgets:
        thresholds = _thresholds(b["thresholds"])
        got = measure(model, images, labels, lambda x, t=thresholds: early_exit(model, x, t, confidence, readout),
                      device, batch_size)
        correct, exit_sim = simulated(saved["test_logits"], saved["test_labels"], thresholds, confidence)
        sim_acc = 100.0 * float(correct.sum()) / n
        differ = int(((got["exit_b1"] != exit_sim) | (got["exit_batched"] != exit_sim)).sum())
        expected = float(macs[exit_sim].mean())
        rows.append(_row(common, "budget", b["p"], None, got, sim_acc, differ, expected,
                         float(macs[got["exit_b1"]].mean())))
    return rows


def _row(common, policy, p, exit_, got, sim_acc, differ, expected_macs, real_macs) -> dict[str, Any]:
    return {"policy": policy, "p": p, "exit": exit_, **common, "sim_acc": sim_acc, "real_acc_b1": got["acc_b1"],
            "real_acc_batched": got["acc_batched"],
            "acc_diff": max(abs(got["acc_b1"] - sim_acc), abs(got["acc_batched"] - sim_acc)),
            "exits_differing": differ, "expected_macs": expected_macs, "real_macs": real_macs,
            "ms_mean": got["ms_mean"], "ms_p50": got["ms_p50"], "ms_p90": got["ms_p90"],
            "batched_ms_per_image": got["batched_ms_per_image"],
            "batched_images_per_s": got["batched_images_per_s"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [f"real early exit on {first['device']}: {first['images']} test images, batch 1 and batch "
             f"{first['batch_size']}; accuracy simulated from logits.pt vs real (batch 1 / batched)",
             f"{'policy':>9}  {'sim %':>6}  {'real %':>6}  {'batch %':>7}  {'E[MACs] M':>9}  {'ms mean':>8}  "
             f"{'p50':>7}  {'p90':>7}  {'ms/img B':>8}  {'img/s B':>8}  differ"]
    for r in rows:
        label = f"exit {r['exit']}" if r["policy"] == "exit" else f"p={r['p']}"
        lines.append(f"{label:>9}  {r['sim_acc']:>6.2f}  {r['real_acc_b1']:>6.2f}  {r['real_acc_batched']:>7.2f}  "
                     f"{r['expected_macs'] / 1e6:>9.4f}  {r['ms_mean']:>8.3f}  {r['ms_p50']:>7.3f}  "
                     f"{r['ms_p90']:>7.3f}  "
                     f"{r['batched_ms_per_image']:>8.4f}  {r['batched_images_per_s']:>8.0f}  {r['exits_differing']}")
    budgets = [r for r in rows if r["policy"] == "budget"]
    worst = max(budgets, key=lambda r: r["acc_diff"], default=None)
    if worst is None:
        pass
    elif worst["acc_diff"] == 0 and all(r["exits_differing"] == 0 for r in budgets):
        lines.append(f"check: real-exit accuracy equals the simulated one at all {len(budgets)} budgets "
                     f"(every image left at the same exit)")
    else:
        lines.append(f"check: DIFFERENCE: up to {worst['acc_diff']:.2f} points (p={worst['p']}); "
                     f"{sum(r['exits_differing'] > 0 for r in budgets)} budgets have images leaving at another exit "
                     f"than simulated (logits differ between this device/batching and logits.pt)")
    return "\n".join(lines)
