"""Evaluation protocols on per-exit logits: anytime, budgeted batch, threshold sweep, summary metrics.

Everything here works on a logits dict (bench.evaluate.logits: `val_logits` [K, N, C] on the calibration
split, `val_labels`, `test_logits` [K, M, C], `test_labels`, cumulative `macs` [K]), no model needed; only
`evaluate_model`, which the trial loop calls after training, first collects it from the model.

Budgeted batch ("dynamic") evaluation is the MSDNet / L2W-DEN `dynamic_evaluate` protocol, exactly:
39 budgets p = 1..39, ratio q = p/20, exit proportions pi_k = q^k / sum_j q^j (computed in float32 with
the reference's operations, so floor(n * pi_k) is the reference's integer). For k < K, among calibration
samples that have not exited, T_k is the confidence of the floor(n*pi_k)-th most confident one; every
remaining sample with confidence >= T_k exits at k (so ties may let more exit). If floor(n*pi_k) = 0 or
fewer samples remain, nothing exits at k ("never", the reference's T = 1e8); the last exit takes everything
left ("always", the reference's T = -1e8). Both are JSON null: in `thresholds`, null at the last position
means "always", null anywhere else means "never". On test, a sample exits at the first k with conf >= T_k.

Confidence is computed from float32 softmax probabilities as the reference does (it stores float32
softmax outputs), so samples that saturate at probability 1.0 tie exactly as they do there. A sample's
prediction is the argmax of those probabilities, the first index among equal ones (the reference's
`probs.max(dim)`); top-5 ranks the logits, lower index first among equal ones. Accuracies are percent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from bench.errors import UsageError
from bench.evaluate.batches import single_threaded
from bench.evaluate.curves import acc_at, area_under, budget_curve, macs_to_reach, one_curve
from bench.evaluate.logits import collect_exits, save_logits, validate_logits

CONFIDENCES = ("max_softmax", "entropy", "margin")
NUM_BUDGETS = 39
_ROWS = 512  # rows per chunk: small enough to stay in cache across its passes, big enough to amortise calls
_MIN_WORK_PER_THREAD = 1 << 20  # logits per worker thread below which threads cost more than they save
# The protocol's torch ops run single-threaded (batches.single_threaded): they are many and mid-sized, and on a
# busy machine a 2-thread team per op waits milliseconds for its second thread, which costs more than it saves.


# ----------------------------------------------------------------------------------- per-exit scores


class ExitScores(NamedTuple):
    conf: torch.Tensor  # [K, N] float32 confidence (higher = more confident)
    top1: torch.Tensor  # [K, N] bool: the prediction is right
    top5: torch.Tensor | None  # [K, N] bool: the label is among the 5 first classes (when asked for)


def probabilities(x: torch.Tensor, confidence: str, out: torch.Tensor, conf: torch.Tensor, top: torch.Tensor,
                   work: torch.Tensor) -> None:
    """Softmax of rows x into `out`, their confidence into `conf` and largest probability into `top`
    (float32 softmax, what the reference stores and compares)."""
    if confidence == "max_softmax":
        torch.ops.aten._softmax.out(x, -1, False, out=out)
        torch.amax(out, -1, out=conf)
        if top.data_ptr() != conf.data_ptr():
            top.copy_(conf)
    elif confidence == "entropy":  # negative entropy: higher = more confident
        torch.ops.aten._log_softmax.out(x, -1, False, out=work)
        torch.exp(work, out=out)
        torch.amax(out, -1, out=top)
        torch.mul(out, work, out=work)
        torch.sum(work, -1, out=conf)
    else:  # margin: top-1 minus top-2 probability (1.0 for a single class)
        torch.ops.aten._softmax.out(x, -1, False, out=out)
        if x.shape[1] == 1:
            top.copy_(out[:, 0])
            conf.copy_(top)
        else:
            top2 = out.topk(2, dim=-1).values
            top.copy_(top2[:, 0])
            torch.sub(top2[:, 0], top2[:, 1], out=conf)


def _score_rows(logits, labels, confidence, parts, k, start, stop) -> None:
    """Rows start:stop of exit k, _ROWS at a time with reused buffers: confidence, largest probability,
    the label's probability, how many classes have the largest, and (for top-5) how many logits are >
    and >= the label's."""
    conf, top, label_prob, at_top, greater, at_least = parts
    C = logits.shape[2]
    rows = min(_ROWS, stop - start)
    probs, work = torch.empty(rows, C), torch.empty(rows, C)
    for a in range(start, stop, rows):
        b = min(stop, a + rows)
        x, y, p, w = logits[k, a:b], labels[a:b, None], probs[: b - a], work[: b - a]
        probabilities(x, confidence, p, conf[k, a:b], top[k, a:b], w)
        torch.gather(p, 1, y, out=label_prob[k, a:b, None])
        torch.eq(p, top[k, a:b, None], out=w)  # how many classes have the largest probability
        torch.sum(w, -1, out=at_top[k, a:b])
        if greater is not None:
            true_logit = x.gather(1, y)
            torch.gt(x, true_logit, out=w)  # into a float buffer: several times faster than a bool one
            torch.sum(w, -1, out=greater[k, a:b])
            torch.ge(x, true_logit, out=w)
            torch.sum(w, -1, out=at_least[k, a:b])


def _blocks(index: torch.Tensor, size: int = 4096):
    """(exit indices, row indices) of a [M, 2] nonzero() result, `size` at a time (bounded memory)."""
    for start in range(0, len(index), size):
        block = index[start:start + size]
        yield block[:, 0], block[:, 1]


def exit_scores(logits: torch.Tensor, labels: torch.Tensor, confidence: str = "max_softmax",
                top5: bool = False) -> ExitScores:
    """Per exit and sample: confidence, top-1 correctness and (if `top5`) top-5 correctness.

    One softmax pass and one comparison pass over the logits (two more for top-5), in cache-sized row
    chunks; the rare rows with ties are settled afterwards. Threads: each torch op runs single-threaded
    and the rows are split between worker threads instead; on a busy machine, per-op thread teams over
    small chunks wait on each other for milliseconds."""
    if confidence not in CONFIDENCES:
        raise UsageError(f"confidence {confidence!r} is unknown; choose one of {', '.join(CONFIDENCES)}")
    logits, labels = logits.float(), labels.long()
    K, N, C = logits.shape
    conf = torch.empty(K, N)
    top = conf if confidence == "max_softmax" else torch.empty(K, N)
    parts = (conf, top, torch.empty(K, N), torch.empty(K, N),
             *((torch.empty(K, N), torch.empty(K, N)) if top5 else (None, None)))
    with single_threaded() as threads:
        workers = max(1, min(threads, K * N * C // _MIN_WORK_PER_THREAD))
        spans = [(k, N * i // workers, N * (i + 1) // workers) for k in range(K) for i in range(workers)]
        if workers == 1:
            for k, a, b in spans:
                _score_rows(logits, labels, confidence, parts, k, a, b)
        else:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                jobs = [pool.submit(_score_rows, logits, labels, confidence, parts, k, a, b) for k, a, b in spans]
                for job in jobs:
                    job.result()
        _, _, label_prob, at_top, greater, at_least = parts
        # Prediction = argmax of the probabilities, first index among equal ones (the reference's
        # `probs.max(dim)`): right when the label's probability is the largest and no earlier class has
        # the same.
        top1 = label_prob == top
        tied = (top1 & (at_top > 1)).nonzero()  # the label shares the largest probability: first index wins
        for ks, rows in _blocks(tied):
            p, n = torch.empty(len(rows), C), len(rows)
            # Softmax works row by row, so these rows get the same bits as in the pass above.
            probabilities(logits[ks, rows], confidence, p, torch.empty(n), torch.empty(n), torch.empty(n, C))
            top1[ks, rows] = (p == top[ks, rows, None]).byte().argmax(1) == labels[rows]
        top5_right = None
        if top5:
            # Label rank on the logits: larger logits first, lower index first among equal ones.
            tied = ((at_least - greater) > 1).nonzero()  # another class has exactly the label's logit
            for ks, rows in _blocks(tied):
                x, y = logits[ks, rows], labels[rows]
                earlier = (x == x.gather(1, y[:, None])) & (torch.arange(C) < y[:, None])
                greater[ks, rows] += earlier.sum(1).float()
            top5_right = greater < 5
    return ExitScores(conf, top1, top5_right)


# ------------------------------------------------------------------------------------------- anytime


def anytime(logits: torch.Tensor, labels: torch.Tensor, macs, *, scores: ExitScores | None = None) -> list[dict]:
    """Top-1 / top-5 accuracy (percent) of every exit on its own, with the exit's cumulative MACs."""
    if scores is None or scores.top5 is None:
        scores = exit_scores(logits, labels, top5=True)
    macs = torch.as_tensor(macs, dtype=torch.float64).tolist()
    n = scores.top1.shape[1]
    top1, top5 = scores.top1.sum(1).tolist(), scores.top5.sum(1).tolist()
    return [{"exit": k + 1, "top1": top1[k] * 100.0 / n, "top5": top5[k] * 100.0 / n, "macs": macs[k]}
            for k in range(len(top1))]


# ------------------------------------------------------------------------------------ budgeted batch


def budget_proportions(num_exits: int) -> torch.Tensor:
    """[39, K] float32 exit proportions pi_k = q^k / sum_j q^j, q = p/20, with the reference's float32
    operations (exp(log q * k), normalised), so floor(n * pi_k) matches it bit for bit."""
    k = torch.arange(1, num_exits + 1, dtype=torch.float32)
    rows = []
    for p in range(1, NUM_BUDGETS + 1):
        q = torch.full((1,), p / 20.0, dtype=torch.float32)
        probs = torch.exp(torch.log(q) * k)
        rows.append(probs / probs.sum())
    return torch.stack(rows)


def exit_quotas(num_samples: int, proportions: torch.Tensor) -> torch.Tensor:
    """floor(n * pi_k) as the reference computes it: a float32 product (int * float32 tensor), floored."""
    return torch.floor(num_samples * proportions).long()


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Trues per row of a [B, n] bool mask (through uint8 with int32 sums: several times faster)."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32)


def calibrate_thresholds(conf: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Thresholds [B, K] (float32) from calibration confidences [K, n] and quotas floor(n * pi_k) [B, K],
    all B budgets at once. +inf means "never" (nobody exits there), -inf "always" (the last exit).

    For exit k, walk the samples by decreasing confidence and count only those not yet exited (the
    reference's loop): T_k is the confidence where the count reaches the quota. Vectorised: the
    not-yet-exited mask is built directly in exit k's sorted order, counted with a cumulative sum, and
    the quota's position found by binary search."""
    K, n = conf.shape
    quotas = torch.as_tensor(quotas).long().reshape(-1, K)
    B = quotas.shape[0]
    thresholds = torch.full((B, K), math.inf)
    thresholds[:, K - 1] = -math.inf
    remaining, below = torch.empty(B, n, dtype=torch.bool), torch.empty(B, n, dtype=torch.bool)
    for k in range(K - 1):
        want = quotas[:, k]
        values, order = conf[k].sort(descending=True)
        remaining.fill_(True)
        for j in range(k):  # still here at exit k = below the threshold of every earlier exit
            torch.lt(conf[j][order], thresholds[:, j, None], out=below)
            remaining &= below
        seen = remaining.view(torch.uint8).cumsum(1, dtype=torch.int32)  # remaining among the i most confident
        at = torch.searchsorted(seen, want[:, None].int()).squeeze(1)  # where the count first reaches the quota
        found = (want > 0) & (at < n)  # else the reference keeps T_k = 1e8: nobody exits at k
        thresholds[:, k] = torch.where(found, values[at.clamp(max=n - 1)], math.inf)
    return thresholds


def tally_exits(conf: torch.Tensor, correct: torch.Tensor, thresholds: torch.Tensor, macs: torch.Tensor,
                strict: bool = False) -> list[tuple[float, list[float], float]]:
    """Apply each row of thresholds [B, K] to confidences [K, n]: a sample exits at the first k with
    conf >= T_k (conf > T_k if strict), the last exit takes the rest whatever its threshold. Returns per
    row (accuracy %, exit fractions, expected MACs = sum_k fraction_k * MACs_k)."""
    K, n = conf.shape
    thresholds = thresholds.reshape(-1, K)
    B = thresholds.shape[0]
    undecided = torch.ones(B, n, dtype=torch.bool)
    leave, right = torch.empty(B, n, dtype=torch.bool), torch.empty(B, n, dtype=torch.bool)
    hits, counts = torch.zeros(B, dtype=torch.long), torch.zeros(B, K, dtype=torch.long)
    for k in range(K):
        if k < K - 1:
            (torch.gt if strict else torch.ge)(conf[k], thresholds[:, k, None], out=leave)
            leave &= undecided
            undecided ^= leave
        else:
            leave = undecided
        counts[:, k] = _count(leave)
        torch.logical_and(leave, correct[k], out=right)
        hits += _count(right)
    out = []
    for hit, row in zip(hits.tolist(), counts.tolist()):
        fractions = [c / n for c in row]
        out.append((hit * 100.0 / n, fractions, sum(f * m for f, m in zip(fractions, macs.tolist()))))
    return out


def _threshold_json(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def budgeted(val_logits, val_labels, test_logits, test_labels, macs, confidence: str = "max_softmax", *,
             val_scores=None, test_scores=None) -> list[dict]:
    """The 39-budget MSDNet / L2W-DEN protocol: thresholds from the calibration split (val_*), applied
    to test. One dict per budget: p, exit_fractions (test), thresholds (None = never / always, see the
    module doc), test_acc, val_acc (percent), expected_macs (test, sum_k fraction_k * MACs_k) and
    val_expected_macs (the same on the calibration split: what choosing among budgets may look at).

    `val_scores` / `test_scores` may pass precomputed `exit_scores(...)` to skip the softmax pass."""
    val_scores = val_scores or exit_scores(val_logits, val_labels, confidence)
    test_scores = test_scores or exit_scores(test_logits, test_labels, confidence)
    val_conf, test_conf = val_scores.conf, test_scores.conf
    macs = torch.as_tensor(macs, dtype=torch.float64)
    K, n_val = val_conf.shape
    with single_threaded():
        thresholds = calibrate_thresholds(val_conf, exit_quotas(n_val, budget_proportions(K)))
        val = tally_exits(val_conf, val_scores.top1, thresholds, macs)
        test = tally_exits(test_conf, test_scores.top1, thresholds, macs)
    return [{"p": p, "exit_fractions": test_fractions, "thresholds": [_threshold_json(t) for t in row],
             "test_acc": test_acc, "val_acc": val_acc, "expected_macs": expected, "val_expected_macs": val_expected}
            for p, row, (val_acc, _, val_expected), (test_acc, test_fractions, expected)
            in zip(range(1, NUM_BUDGETS + 1), thresholds.tolist(), val, test)]


# ----------------------------------------------------------------------------------- threshold sweep


def default_thresholds(confidence: str, num_classes: int) -> list[float]:
    """101 evenly spaced thresholds over the confidence's range: [0, 1] for max_softmax and margin,
    [-ln C, 0] for negative entropy."""
    low = -math.log(num_classes) if confidence == "entropy" else 0.0
    return torch.linspace(low, 0.0 if confidence == "entropy" else 1.0, 101, dtype=torch.float64).tolist()


def threshold_sweep(logits, labels, macs, thresholds: Sequence[float] | None = None,
                    confidence: str = "max_softmax", *, scores=None) -> list[dict]:
    """The Shallow-Deep Networks / Zero-Time-Waste protocol: one global threshold t applied directly on
    the given split; a sample exits at the first k < K with confidence > t (strict, as ZTW's code), the
    last exit takes the rest. `logits` are what the exits report: a run's readout outputs (logits.pt's
    `test_logits`), never its `test_raw_logits`. One dict per threshold: threshold, acc (%),
    expected_macs, exit_fractions."""
    conf, top1, _ = scores or exit_scores(logits, labels, confidence)
    K = conf.shape[0]
    if thresholds is None:
        thresholds = default_thresholds(confidence, logits.shape[2])
    macs = torch.as_tensor(macs, dtype=torch.float64)
    # Compare in float32, as the confidences are (ZTW's thresholds are a float32 linspace).
    grid = torch.tensor([float(t) for t in thresholds], dtype=torch.float32)[:, None].expand(-1, K)
    with single_threaded():
        results = tally_exits(conf, top1, grid, macs, strict=True)
    return [{"threshold": float(t), "acc": acc, "expected_macs": expected, "exit_fractions": fractions}
            for t, (acc, fractions, expected) in zip(thresholds, results)]


# ------------------------------------------------------------------------------------------- summary

def anytime_area(anytime_rows: list[dict], low: float, high: float) -> float:
    """Mean top-1 (%) over [low, high] MACs of the anytime step curve: at a budget, the deepest exit
    whose cumulative MACs fit (the one an anytime model would have answered with)."""
    steps = [(float(r["macs"]), float(r["top1"])) for r in anytime_rows]
    if not high > low or low < steps[0][0]:
        raise UsageError(f"anytime AUC range [{low}, {high}] must be non-empty and start at or above exit 1's "
                         f"{steps[0][0]:g} MACs")
    area = 0.0
    for i, (m, acc) in enumerate(steps):
        end = steps[i + 1][0] if i + 1 < len(steps) else math.inf
        lo, hi = max(m, low), min(end, high)
        if hi > lo:
            area += (hi - lo) * acc
    return area / (high - low)


def oracle(top1: torch.Tensor, macs) -> tuple[float, float]:
    """(accuracy %, mean MACs) when each sample leaves at its earliest correct exit (never correct: last exit)."""
    K, n = top1.shape
    macs = torch.as_tensor(macs, dtype=torch.float64)
    any_correct = top1.any(0)
    exit_at = torch.where(any_correct, top1.byte().argmax(0), torch.full((n,), K - 1))
    return float(any_correct.sum()) * 100.0 / n, float(macs[exit_at].mean())


def summarise(budgets: list[dict], anytime_rows: list[dict], macs, test_logits=None, test_labels=None, *,
              at_macs: Sequence[float] = (), target_accs: Sequence[float] = (),
              auc_range: tuple[float, float] | None = None, confidence: str | None = None,
              test_top1: torch.Tensor | None = None) -> dict:
    """Summary metrics of the budgeted curve (see `budget_curve`: the 39 budgets plus every exit on its
    own, so it spans exit 1's to exit K's MACs) and the oracle exit.

    Keys: acc_at_{25,50,75,100}pct (accuracy at that share of exit K's MACs, linear on the monotone upper
    envelope), acc_at_macs, auc (mean accuracy % of the envelope over auc_range, default [MACs_1, MACs_K]),
    anytime_auc (same range, anytime step curve), best_acc (the best of the 39 budgets' test accuracies,
    as papers report the dynamic curve's peak) and its expected MACs, full_acc (exit K's top-1) with
    macs_at_full_acc and speedup_at_full_acc (= MACs_K / that), macs_to_reach for target_accs, oracle_acc
    and oracle_macs (needs test_logits + test_labels, or test_top1 [K, N] from exit_scores)."""
    macs = torch.as_tensor(macs, dtype=torch.float64)
    curve = one_curve(budget_curve(budgets, anytime_rows))
    env_macs, env_acc = curve.points("trial")
    last = float(macs[-1])
    low, high = (float(macs[0]), last) if auc_range is None else (float(auc_range[0]), float(auc_range[1]))
    if auc_range is None and len(macs) == 1:  # one exit: the curve is one point, the area its accuracy
        auc = any_auc = float(anytime_rows[-1]["top1"])
    else:
        auc, any_auc = area_under(curve, low, high), anytime_area(anytime_rows, low, high)
    full_acc = float(anytime_rows[-1]["top1"])
    full_macs = macs_to_reach(curve, full_acc)
    best = max(budgets, key=lambda b: (b["test_acc"], -b["expected_macs"]), default=None)
    summary: dict[str, Any] = {
        "confidence": confidence,
        "curve": "39 budgets + each exit alone (static); monotone upper envelope, linear between points",
        "last_exit_macs": last,
        **{f"acc_at_{pct}pct": acc_at(curve, last * pct / 100) for pct in (25, 50, 75, 100)},
        "acc_at_macs": [{"macs": float(m), "acc": acc_at(curve, float(m))} for m in at_macs],
        "auc": auc,
        "anytime_auc": any_auc,
        "auc_range": [low, high],
        "auc_unit": "mean test top-1 % over auc_range (area / range width)",
        "best_acc": best["test_acc"] if best else float(env_acc[-1]),
        "best_acc_macs": best["expected_macs"] if best else float(env_macs[-1]),
        "full_acc": full_acc,
        "macs_at_full_acc": full_macs,
        "speedup_at_full_acc": (last / full_macs) if full_macs else None,
        "macs_to_reach": [{"acc": float(a), "macs": macs_to_reach(curve, float(a))} for a in target_accs],
    }
    if test_top1 is None and test_logits is not None and test_labels is not None:
        test_top1 = exit_scores(test_logits, test_labels).top1
    if test_top1 is not None:
        summary["oracle_acc"], summary["oracle_macs"] = oracle(test_top1, macs)
    return summary


def evaluate_logits(data: dict, confidence: str = "max_softmax", *, at_macs: Sequence[float] = (),
                    target_accs: Sequence[float] = (), auc_range: tuple[float, float] | None = None) -> dict:
    """{"anytime": [...], "budgets": [...], "summary": {...}}: exactly what `exitbench budget --json` prints."""
    if confidence not in CONFIDENCES:
        raise UsageError(f"confidence {confidence!r} is unknown; choose one of {', '.join(CONFIDENCES)}")
    with single_threaded():
        data = validate_logits(data)
    val_scores = exit_scores(data["val_logits"], data["val_labels"], confidence)
    test_scores = exit_scores(data["test_logits"], data["test_labels"], confidence, top5=True)
    macs = data["macs"]
    anytime_rows = anytime(data["test_logits"], data["test_labels"], macs, scores=test_scores)
    if "readout_macs" in data:
        for row, share in zip(anytime_rows, data["readout_macs"].tolist()):
            row["readout_macs"] = share
    budgets = budgeted(None, None, None, None, macs, confidence, val_scores=val_scores, test_scores=test_scores)
    summary = summarise(budgets, anytime_rows, macs, at_macs=at_macs, target_accs=target_accs,
                        auc_range=auc_range, confidence=confidence, test_top1=test_scores.top1)
    return {"anytime": anytime_rows, "budgets": budgets, "summary": summary}


def evaluate_model(model, readout, calib_loader, test_loader, device, macs, *, readout_macs=None,
                   confidence: str = "max_softmax", logits_path=None, progress: bool = False) -> dict:
    """Collect the calibration and test splits through the readout, write `logits_path` (readout outputs
    and raw exits) when given, and evaluate the readout outputs (`evaluate_logits`). `macs` are the
    cumulative per-exit MACs, readout included; `readout_macs` the readout's share of them. `progress`: a
    progress bar per split on stderr (bench.evaluate.batches)."""
    val = collect_exits(model, calib_loader, device, readout, progress=progress, desc="evaluating: calibration")
    test = collect_exits(model, test_loader, device, readout, progress=progress, desc="evaluating: test")
    data = {"val_logits": val.outputs, "val_labels": val.labels, "test_logits": test.outputs,
            "test_labels": test.labels, "macs": macs, "val_raw_logits": val.raw, "test_raw_logits": test.raw}
    if readout_macs is not None:
        data["readout_macs"] = readout_macs
    if logits_path is not None:
        save_logits(logits_path, val.outputs, val.labels, test.outputs, test.labels, macs,
                    raw=(val.raw, test.raw), readout_macs=readout_macs)
    return evaluate_logits(data, confidence=confidence)
