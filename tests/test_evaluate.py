"""Evaluation protocols: hand-made cases with known answers, a property test against a slow loop-based
transcription of MSDNet's `dynamic_evaluate`, summary metrics, logits files and the `budget` CLI."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from bench.errors import UsageError
from bench.evaluate import curves, protocol
from bench.evaluate.logits import KEYS, collect_logits, load_logits, save_logits


def two_class(margins):
    """[N, 2] logits whose max-softmax confidence is sigmoid(margin): row = [margin, 0]."""
    m = torch.tensor(margins, dtype=torch.float32)
    return torch.stack([m, torch.zeros_like(m)], dim=1)


def conf_of(margin):
    return float(torch.softmax(torch.tensor([margin, 0.0]), 0).max())


def logits_dict(val_logits, val_labels, test_logits, test_labels, macs):
    return {"val_logits": val_logits, "val_labels": torch.as_tensor(val_labels), "test_logits": test_logits,
            "test_labels": torch.as_tensor(test_labels), "macs": torch.as_tensor(macs, dtype=torch.float64)}


# ------------------------------------------------------------------------------- slow reference transcription


def reference_dynamic(val_conf, val_pred, val_y, test_conf, test_pred, test_y, macs):
    """Plain transcription of the reference protocol, one sample at a time (MSDNet-PyTorch / L2W-DEN
    adaptive_inference: Tester.dynamic_eval_find_threshold and dynamic_eval_with_threshold). Values are
    float32 confidences turned into Python floats (exact), so comparisons are the reference's."""
    K, n = val_conf.shape
    sorted_idx = val_conf.sort(dim=1, descending=True).indices.tolist()
    val_conf, val_pred, val_y = val_conf.tolist(), val_pred.tolist(), val_y.tolist()
    test_conf, test_pred, test_y = test_conf.tolist(), test_pred.tolist(), test_y.tolist()
    rows = []
    for p in range(1, 40):
        _p = torch.zeros(1, dtype=torch.float32).fill_(p * 1.0 / 20)
        probs = torch.exp(torch.log(_p) * torch.arange(1, K + 1, dtype=torch.float32))
        probs /= probs.sum()
        filtered = [0] * n
        T = [1e8] * K
        for k in range(K - 1):
            count = 0
            out_n = math.floor(n * probs[k])
            for i in range(n):
                ori_idx = sorted_idx[k][i]
                if filtered[ori_idx] == 0:
                    count += 1
                    if count == out_n:
                        T[k] = val_conf[k][ori_idx]
                        break
            for i in range(n):
                filtered[i] += int(val_conf[k][i] >= T[k])
        T[K - 1] = -1e8

        def run(conf, pred, y, T=T):
            m = len(y)
            acc, exits = 0, [0] * K
            for i in range(m):
                for k in range(K):
                    if conf[k][i] >= T[k]:
                        acc += int(pred[k][i] == y[i])
                        exits[k] += 1
                        break
            return acc * 100.0 / m, [e / m for e in exits]

        val_acc, val_fractions = run(val_conf, val_pred, val_y)
        test_acc, fractions = run(test_conf, test_pred, test_y)
        thresholds = [None if abs(t) == 1e8 else t for t in T]
        expected = sum(f * float(c) for f, c in zip(fractions, macs))
        val_expected = sum(f * float(c) for f, c in zip(val_fractions, macs))
        rows.append({"p": p, "thresholds": thresholds, "val_acc": val_acc, "test_acc": test_acc,
                     "exit_fractions": fractions, "expected_macs": expected, "val_expected_macs": val_expected})
    return rows


def reference_scores(logits, confidence):
    """Confidence and prediction as the reference forms them: from float32 softmax outputs."""
    probs = torch.softmax(logits.float(), dim=2)
    conf, pred = probs.max(dim=2)
    if confidence != "max_softmax":  # the reference has only max softmax; use ours for the other two
        conf = protocol.exit_scores(logits, torch.zeros(logits.shape[1], dtype=torch.long), confidence)[0]
    return conf, pred


def assert_same_budgets(ours, reference):
    assert len(ours) == len(reference) == 39
    for a, b in zip(ours, reference):
        assert a["p"] == b["p"]
        assert a["thresholds"] == b["thresholds"], a["p"]
        assert a["exit_fractions"] == pytest.approx(b["exit_fractions"], abs=1e-12), a["p"]
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-9), a["p"]
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-9), a["p"]
        assert a["expected_macs"] == pytest.approx(b["expected_macs"], rel=1e-12), a["p"]
        assert a["val_expected_macs"] == pytest.approx(b["val_expected_macs"], rel=1e-12), a["p"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(K=st.integers(1, 4), C=st.integers(1, 4), n_val=st.integers(1, 24), n_test=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1), confidence=st.sampled_from(protocol.CONFIDENCES),
       values=st.sampled_from([(0.0, 1.0), (-1.0, 0.0, 2.0), (0.0, 0.5, 1.0, 40.0)]))
def test_budgeted_matches_slow_reference_transcription(K, C, n_val, n_test, seed, confidence, values):
    # Logits drawn from a few values so confidences tie (within and across exits, saturated at 1.0 too).
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(values)
    val_logits = pool[torch.randint(len(values), (K, n_val, C), generator=g)]
    test_logits = pool[torch.randint(len(values), (K, n_test, C), generator=g)]
    val_y = torch.randint(C, (n_val,), generator=g)
    test_y = torch.randint(C, (n_test,), generator=g)
    macs = torch.cumsum(torch.randint(1, 100, (K,), generator=g).double(), 0)
    ours = protocol.budgeted(val_logits, val_y, test_logits, test_y, macs, confidence=confidence)
    reference = reference_dynamic(*reference_scores(val_logits, confidence), val_y,
                                  *reference_scores(test_logits, confidence), test_y, macs)
    assert_same_budgets(ours, reference)


# ----------------------------------------------------------------------------------------- hand-made cases


def test_tie_at_threshold_lets_more_exit():
    # K=2, p=20 -> pi = (1/2, 1/2), n=10 -> quota 5. The 5th most confident shares its value with two
    # more samples, so 7 exit at exit 1 (>=), not 5.
    margins = [5.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0, -1.0]
    logits = torch.stack([two_class(margins), two_class(margins)])
    labels = torch.zeros(10, dtype=torch.long)
    row = protocol.budgeted(logits, labels, logits, labels, [10.0, 30.0])[19]
    assert row["p"] == 20
    assert row["thresholds"] == [conf_of(2.0), None]
    assert row["exit_fractions"] == [0.7, 0.3]
    assert row["expected_macs"] == pytest.approx(0.7 * 10 + 0.3 * 30)


def test_quota_below_one_and_empty_exit():
    # K=3, n=3, p=1: pi ~ (0.952, 0.048, 0.002) -> quotas (2, 0, 0): exit 2 never takes anyone.
    margins = [3.0, 2.0, 1.0]
    logits = torch.stack([two_class(margins)] * 3)
    labels = torch.tensor([0, 0, 1])
    row = protocol.budgeted(logits, labels, logits, labels, [1.0, 2.0, 3.0])[0]
    assert row["thresholds"] == [conf_of(2.0), None, None]
    assert row["exit_fractions"] == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert row["val_acc"] == pytest.approx(100 * 2 / 3)  # sample 3 is wrong at every exit


def test_fewer_remaining_than_quota_means_nobody_exits():
    # K=3, p=20 (uniform), n=4 -> quota 1 per exit. All four tie at exit 1, so all exit there; exit 2
    # then finds fewer samples than its quota (0 < 1) and its threshold is "never".
    logits = torch.stack([two_class([1.0] * 4), two_class([9.0, 8.0, 7.0, 6.0]), two_class([0.0] * 4)])
    labels = torch.zeros(4, dtype=torch.long)
    row = protocol.budgeted(logits, labels, logits, labels, [1.0, 2.0, 3.0])[19]
    assert row["thresholds"] == [conf_of(1.0), None, None]
    assert row["exit_fractions"] == [1.0, 0.0, 0.0]


def test_all_test_samples_confident_at_exit_one():
    g = torch.Generator().manual_seed(0)
    val = torch.randn(2, 20, 2, generator=g)
    test = torch.stack([two_class([100.0] * 6), two_class([0.5] * 6)])  # softmax saturates to exactly 1.0
    test_y = torch.tensor([0, 0, 0, 1, 1, 1])
    for row in protocol.budgeted(val, torch.zeros(20, dtype=torch.long), test, test_y, [5.0, 8.0]):
        assert row["exit_fractions"] == [1.0, 0.0]
        assert row["expected_macs"] == 5.0 and row["test_acc"] == 50.0


def test_single_exit():
    g = torch.Generator().manual_seed(1)
    val, test = torch.randn(1, 7, 3, generator=g), torch.randn(1, 5, 3, generator=g)
    test_y = test[0].argmax(1)
    test_y[0] = (test_y[0] + 1) % 3
    rows = protocol.budgeted(val, torch.zeros(7, dtype=torch.long), test, test_y, [42.0])
    assert len(rows) == 39
    assert all(r["exit_fractions"] == [1.0] and r["thresholds"] == [None] and r["test_acc"] == 80.0
               and r["expected_macs"] == 42.0 for r in rows)
    report = protocol.evaluate_logits(logits_dict(val, torch.zeros(7, dtype=torch.long), test, test_y, [42.0]))
    assert report["summary"]["auc"] == 80.0 and report["summary"]["oracle_acc"] == 80.0


def test_proportions_and_quotas_follow_the_reference_formula():
    for K in (1, 2, 5, 7):
        props = protocol.budget_proportions(K)
        assert props.shape == (39, K) and props.dtype == torch.float32
        for p in (1, 20, 39):
            _p = torch.zeros(1).fill_(p / 20)
            ref = torch.exp(torch.log(_p) * torch.arange(1, K + 1, dtype=torch.float32))
            ref /= ref.sum()
            assert torch.equal(props[p - 1], ref)
            for n in (3, 1000, 50000, 1281167):
                assert protocol.exit_quotas(n, props[p - 1]).tolist() == [math.floor(n * ref[k]) for k in range(K)]
    assert protocol.exit_quotas(50000, protocol.budget_proportions(5)[19]).tolist() == [10000] * 5


def test_confidences():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 3.0, 1.0], [0.0, 4.0, 4.0]]])
    labels = torch.tensor([0, 2, 1, 2])
    p = torch.softmax(logits[0].double(), 1)
    conf, top1, top5 = protocol.exit_scores(logits, labels, "max_softmax")
    assert top5 is None
    assert torch.allclose(conf[0].double(), p.max(1).values, atol=1e-6)
    conf, _, _ = protocol.exit_scores(logits, labels, "entropy")
    assert torch.allclose(conf[0].double(), (p * p.log()).sum(1), atol=1e-6)
    assert conf[0, 1] == pytest.approx(-math.log(3), abs=1e-6)  # uniform: lowest confidence
    conf, _, _ = protocol.exit_scores(logits, labels, "margin")
    top2 = p.topk(2, 1).values
    assert torch.allclose(conf[0].double(), top2[:, 0] - top2[:, 1], atol=1e-6)
    # Ties: the first index wins, as argmax does.
    for confidence in protocol.CONFIDENCES:
        _, top1, top5 = protocol.exit_scores(logits, labels, confidence, top5=True)
        assert top1[0].tolist() == [True, False, True, False] and top5[0].all()
    with pytest.raises(UsageError, match="confidence"):
        protocol.exit_scores(logits, labels, "energy")


def test_anytime_top1_top5_and_ties():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, 8, generator=g)
    logits[:, :5] = 0.0  # whole rows tied: the prediction is class 0, the top 5 are classes 0..4
    labels = torch.randint(8, (50,), generator=g)
    rows = protocol.anytime(logits, labels, [1.0, 2.0, 3.0])
    for k, row in enumerate(rows):
        pred = logits[k].argmax(1)
        top5 = torch.stack([logits[k, i].topk(5).indices for i in range(50)])  # no ties outside rows 0..4
        in_top5 = [(labels[i] in top5[i]) if i >= 5 else labels[i] < 5 for i in range(50)]
        assert row == {"exit": k + 1, "top1": float((pred == labels).sum()) * 2.0,
                       "top5": sum(map(bool, in_top5)) * 2.0, "macs": float(k + 1)}


def test_chunked_scores_cover_many_rows():
    # More rows than one chunk, ties in a later chunk, and enough work for the worker threads.
    g = torch.Generator().manual_seed(3)
    n = protocol._ROWS * 2 + 17
    logits = torch.randn(2, n, 6, generator=g)
    logits[1, -3] = 1.0
    logits[1, -2, :3] = 9.0
    labels = torch.randint(6, (n,), generator=g)
    labels[-3], labels[-2] = 4, 1
    for workers_threshold in (1 << 20, 1):  # one thread, then two workers
        protocol._MIN_WORK_PER_THREAD, before = workers_threshold, protocol._MIN_WORK_PER_THREAD
        try:
            conf, top1, top5 = protocol.exit_scores(logits, labels, top5=True)
        finally:
            protocol._MIN_WORK_PER_THREAD = before
        assert torch.equal(conf, torch.softmax(logits, 2).max(2).values)
        assert torch.equal(top1, logits.argmax(2) == labels)
        assert not top1[1, -3] and top5[1, -3]  # label 4 is 5th among six equal logits
        assert not top1[1, -2] and top5[1, -2]


def test_threshold_sweep_uses_strict_comparison():
    # Exit-1 confidences sigmoid(1), sigmoid(3), sigmoid(0.5); sample 2 is right only at exit 2.
    logits = torch.stack([two_class([1.0, 3.0, 0.5]), two_class([5.0, 5.0, -5.0])])
    labels = torch.tensor([0, 0, 1])
    t = conf_of(1.0)
    rows = protocol.threshold_sweep(logits, labels, [10.0, 20.0], thresholds=[0.0, t, 1.0])
    # At t = sigmoid(1) sample 0 (exactly at t) does not exit: the comparison is strict.
    assert [r["exit_fractions"] for r in rows] == [[1.0, 0.0], [1 / 3, 2 / 3], [0.0, 1.0]]
    assert rows[1]["expected_macs"] == pytest.approx(10 / 3 + 40 / 3)
    assert rows[0]["acc"] == pytest.approx(200 / 3) and rows[1]["acc"] == 100.0 and rows[2]["acc"] == 100.0
    default = protocol.threshold_sweep(logits, labels, [10.0, 20.0], confidence="entropy")
    assert len(default) == 101 and default[0]["threshold"] == pytest.approx(-math.log(2))


# ------------------------------------------------------------------------------------------------ summary


def test_envelope_interpolation_and_speedup():
    curve = [(1.0, 50.0), (2.0, 70.0), (3.0, 60.0), (4.0, 80.0), (1.5, 40.0)]
    assert curves.envelope(curve) == [(1.0, 50.0), (2.0, 70.0), (4.0, 80.0)]
    assert curves.acc_at(curve, 0.5) is None
    assert curves.acc_at(curve, 1.5) == pytest.approx(60.0)
    assert curves.acc_at(curve, 3.0) == pytest.approx(75.0)
    assert curves.acc_at(curve, 9.0) == 80.0
    assert curves.macs_to_reach(curve, 45.0) == 1.0
    assert curves.macs_to_reach(curve, 75.0) == pytest.approx(3.0)
    assert curves.macs_to_reach(curve, 81.0) is None
    baseline = [(2.0, 50.0), (8.0, 80.0)]
    assert curves.speedup_at_equal_accuracy(curve, baseline, 80.0) == pytest.approx(2.0)
    assert curves.speedup_at_equal_accuracy(curve, baseline, 90.0) is None
    # Area of 50->70 over [1,2] plus 70->80 over [2,4], divided by 3.
    assert curves.area_under(curve, 1.0, 4.0) == pytest.approx((60.0 + 2 * 75.0) / 3)
    with pytest.raises(UsageError, match="cheapest point"):
        curves.area_under(curve, 0.5, 4.0)


def test_summary_and_oracle():
    anytime_rows = [{"exit": 1, "top1": 50.0, "top5": 90.0, "macs": 10.0},
                    {"exit": 2, "top1": 60.0, "top5": 95.0, "macs": 30.0},
                    {"exit": 3, "top1": 70.0, "top5": 99.0, "macs": 40.0}]
    budgets = [{"p": 1, "expected_macs": 20.0, "test_acc": 65.0}, {"p": 2, "expected_macs": 25.0, "test_acc": 72.0}]
    # Oracle: sample 0 right at exit 2, sample 1 never right (goes to exit 3), sample 2 right at exit 1.
    top1 = torch.tensor([[False, False, True], [True, False, True], [True, False, False]])
    s = protocol.summarise(budgets, anytime_rows, [10.0, 30.0, 40.0], test_top1=top1, at_macs=[15.0],
                           target_accs=[72.0, 99.0])
    assert s["acc_at_25pct"] == 50.0 and s["acc_at_50pct"] == pytest.approx(65.0)
    assert s["acc_at_100pct"] == 72.0 and s["acc_at_macs"] == [{"macs": 15.0, "acc": pytest.approx(57.5)}]
    assert s["best_acc"] == 72.0 and s["best_acc_macs"] == 25.0
    assert s["full_acc"] == 70.0 and s["macs_at_full_acc"] == pytest.approx(20.0 + 5 * 5 / 7)
    assert s["speedup_at_full_acc"] == pytest.approx(40.0 / (20.0 + 25 / 7))
    assert s["macs_to_reach"] == [{"acc": 72.0, "macs": 25.0}, {"acc": 99.0, "macs": None}]
    assert s["auc_range"] == [10.0, 40.0]
    area = 10 * (50 + 65) / 2 + 5 * (65 + 72) / 2 + 15 * 72
    assert s["auc"] == pytest.approx(area / 30)
    assert s["anytime_auc"] == pytest.approx((20 * 50 + 10 * 60) / 30)
    assert s["oracle_acc"] == pytest.approx(200 / 3) and s["oracle_macs"] == pytest.approx((30 + 40 + 10) / 3)
    # Every exit alone is a point of the curve: a strong middle exit lifts the envelope.
    anytime_rows[1]["top1"] = 80.0
    s = protocol.summarise(budgets, anytime_rows, [10.0, 30.0, 40.0])
    assert s["acc_at_75pct"] == 80.0 and s["best_acc"] == 72.0 and "oracle_acc" not in s


def test_summary_and_reports_read_one_curve():
    """A trial's summary (`protocol.summarise`) and the reports (`Curves` over many trials) compute the budgeted
    curve once: acc_at_*pct and auc equal `Curves.envelopes(...).at(...)` / `.mean_over(...)` on the same points."""
    anytime_rows = [{"exit": 1, "top1": 41.5, "top5": 80.0, "macs": 12.0},
                    {"exit": 2, "top1": 63.25, "top5": 90.0, "macs": 31.0},
                    {"exit": 3, "top1": 58.0, "top5": 91.0, "macs": 47.0},
                    {"exit": 4, "top1": 71.125, "top5": 95.0, "macs": 60.0}]
    budgets = [{"p": 1, "expected_macs": 15.5, "test_acc": 47.3}, {"p": 2, "expected_macs": 22.75, "test_acc": 59.9},
               {"p": 3, "expected_macs": 29.0, "test_acc": 57.0}, {"p": 4, "expected_macs": 38.2, "test_acc": 68.4},
               {"p": 5, "expected_macs": 52.6, "test_acc": 70.05}]
    s = protocol.summarise(budgets, anytime_rows, [12.0, 31.0, 47.0, 60.0])
    # The same operating points written out, in another order: each exit alone, then the budgets.
    macs = [60.0, 47.0, 31.0, 12.0, 52.6, 38.2, 29.0, 22.75, 15.5]
    acc = [71.125, 58.0, 63.25, 41.5, 70.05, 68.4, 57.0, 59.9, 47.3]
    reports = curves.Curves.envelopes(["t"] * len(macs), macs, acc)
    at = reports.at([[60.0 * pct / 100 for pct in (25, 50, 75, 100)]])[0]
    for pct, value in zip((25, 50, 75, 100), at):
        assert abs(s[f"acc_at_{pct}pct"] - value) <= 1e-12, pct
    assert abs(s["auc"] - reports.mean_over([12.0], [60.0])[0]) <= 1e-12
    assert s["auc_range"] == [12.0, 60.0]


# ------------------------------------------------------------------------------------ logits files and CLI


class _TwoExits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)

    def forward(self, x):
        z = self.a(x)
        return [z, self.b(z) * 2]


def test_collect_logits_eval_mode_no_grad():
    model = _TwoExits().train()
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    logits, labels = collect_logits(model, DataLoader(TensorDataset(x, y), batch_size=4), "cpu")
    assert logits.shape == (2, 10, 3) and logits.dtype == torch.float32 and not logits.requires_grad
    assert torch.equal(labels, y) and model.training  # mode restored
    assert torch.allclose(logits[1], 2 * model.a(x).detach())  # dropout off while collecting
    with pytest.raises(UsageError, match="no batches"):
        collect_logits(model, [], "cpu")


def _good(K=3, n_val=30, n_test=20, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return logits_dict(torch.randn(K, n_val, C, generator=g), torch.randint(C, (n_val,), generator=g),
                       torch.randn(K, n_test, C, generator=g), torch.randint(C, (n_test,), generator=g),
                       [1e6 * (k + 1) for k in range(K)])


def test_save_load_roundtrip(tmp_path):
    data = _good()
    path = tmp_path / "run" / "logits.pt"
    save_logits(path, data["val_logits"], data["val_labels"], data["test_logits"], data["test_labels"], [1, 2, 3])
    assert [p.name for p in path.parent.iterdir()] == ["logits.pt"]  # no temp file left
    loaded = load_logits(path)
    assert set(loaded) == set(KEYS)
    assert torch.equal(loaded["val_logits"], data["val_logits"]) and loaded["macs"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(UsageError, match="increase strictly"):
        save_logits(tmp_path / "bad.pt", data["val_logits"], data["val_labels"], data["test_logits"],
                       data["test_labels"], [1, 1, 3])
    assert not (tmp_path / "bad.pt").exists()


def test_cli_budget_good_file(run_cli, tmp_path):
    path = tmp_path / "logits.pt"
    torch.save(_good(), path)
    code, out, err = run_cli("budget", path, "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert set(report) == {"anytime", "budgets", "summary"}
    assert set(report["anytime"][0]) == {"exit", "top1", "top5", "macs"}
    assert len(report["budgets"]) == 39
    assert set(report["budgets"][0]) == {"p", "exit_fractions", "thresholds", "test_acc", "val_acc", "expected_macs",
                                         "val_expected_macs"}
    assert all(row["thresholds"][-1] is None for row in report["budgets"])  # last exit: always
    assert report == json.loads(json.dumps(protocol.evaluate_logits(load_logits(path))))
    code, out, _ = run_cli("budget", path, "--confidence", "margin", "--at-macs", "2e6", "--target-acc", "30")
    assert code == 0
    for text in ("anytime", "budgeted batch", "confidence margin", "summary", "oracle exit", "at 2.0000 M MACs"):
        assert text in out


def _bad_cases():
    d = _good()
    yield "missing", {k: v for k, v in d.items() if k != "test_labels"}, "missing key"
    yield "K", {**d, "test_logits": d["test_logits"][:2]}, "K=3 exits but test_logits has K=2"
    yield "macs-len", {**d, "macs": [1.0, 2.0]}, "macs has 2 entries"
    yield "N", {**d, "val_labels": d["val_labels"][:-1]}, "29 labels but val_logits has N=30"
    yield "C", {**d, "test_logits": torch.randn(3, 20, 4)}, "C=5 classes but test_logits has C=4"
    nan = d["val_logits"].clone()
    nan[1, 2, 3] = float("nan")
    yield "nan", {**d, "val_logits": nan}, "1 NaN/inf"
    yield "label-range", {**d, "test_labels": torch.full((20,), 5)}, "outside the 5 classes"
    yield "negative-label", {**d, "val_labels": torch.full((30,), -1)}, "outside the 5 classes"
    yield "macs-order", {**d, "macs": [3.0, 2.0, 4.0]}, "increase strictly"
    yield "float-labels", {**d, "val_labels": d["val_labels"].float()}, "integer tensor"
    yield "not-dict", [1, 2], "expected a dict"


@pytest.mark.parametrize("name,content,message", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_cli_budget_bad_file_is_one_line_exit_2(run_cli, tmp_path, name, content, message):
    path = tmp_path / "logits.pt"
    torch.save(content, path)
    code, out, err = run_cli("budget", path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_cli_budget_unreadable_files(run_cli, tmp_path):
    code, _, err = run_cli("budget", tmp_path / "nope.pt")
    assert code == 2 and "not found" in err and err.count("\n") == 1
    (tmp_path / "junk.pt").write_text("not a torch file")
    code, _, err = run_cli("budget", tmp_path / "junk.pt")
    assert code == 2 and "not a file written by torch.save" in err and err.count("\n") == 1
    assert "In PyTorch 2.6" not in err  # torch's paragraph, not one line
    (tmp_path / "run").mkdir()
    code, _, err = run_cli("budget", tmp_path / "run")
    assert code == 2 and "is a folder without logits.pt" in err and err.count("\n") == 1


def test_cli_budget_takes_a_run_folder(run_cli, tmp_path):
    torch.save(_good(), tmp_path / "logits.pt")
    by_file = run_cli("budget", tmp_path / "logits.pt", "--json")
    by_folder = run_cli("budget", tmp_path, "--json")
    assert by_file[0] == by_folder[0] == 0 and by_file[1] == by_folder[1]


def test_cli_budget_bad_auc_range(run_cli, tmp_path):
    path = tmp_path / "logits.pt"
    torch.save(_good(), path)
    for bounds, message in ((("3e6", "2e6"), "is empty"), (("1", "3e6"), "below the curve's cheapest point")):
        code, out, err = run_cli("budget", path, "--auc-range", *bounds)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1
    code, out, _ = run_cli("budget", path, "--json", "--auc-range", "1.5e6", "3e6")
    assert code == 0 and json.loads(out)["summary"]["auc_range"] == [1.5e6, 3e6]


def test_save_logits_of_a_view_saves_only_its_data(tmp_path):
    big = torch.randn(3, 1000, 5)
    save_logits(tmp_path / "a.pt", big[:, :10], torch.zeros(10, dtype=torch.long), big[:, 10:20],
                   torch.zeros(10, dtype=torch.long), [1, 2, 3])
    assert (tmp_path / "a.pt").stat().st_size < 20_000  # not the 60 kB of `big`
    assert torch.equal(load_logits(tmp_path / "a.pt")["test_logits"], big[:, 10:20])


def test_cli_budget_names_which_best_it_prints(run_cli, tmp_path):
    """The summary's best_acc is the top of the 39 budgets only; reports' best is the top of the curve with each
    exit alone (= acc@100 %). Printed as plain 'best accuracy' beside a higher acc@100 % it read as a bug."""
    torch.save(_good(), tmp_path / "logits.pt")
    code, out, err = run_cli("budget", tmp_path / "logits.pt")
    assert code == 0, err
    summary = json.loads(run_cli("budget", tmp_path / "logits.pt", "--json")[1])["summary"]
    assert f"best of the 39 budgets {summary['best_acc']:.2f} %" in out and "best accuracy" not in out
