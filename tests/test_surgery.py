"""`pcgrad` and `cagrad`: projections and the conflict-averse direction by hand, whole updates against an
independent computation, and checkpoint + resume on digits."""

import math

import pytest
import torch
from torch import nn
from toys import ChainNet

from bench.config import validate_trial
from bench.registry import METHODS, load_all
from bench.trial import train
from methods.cagrad import cagrad_direction
from methods.pcgrad import project_conflicting

load_all()




def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# --- PCGrad -----------------------------------------------------------------------------------------------

def test_pcgrad_projects_two_conflicting_gradients():
    """g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0. g1 - (-1)/|g2|^2 g2 = (1/2, 1/2); g2 - (-1)/|g1|^2 g1 = (0, 1);
    the update is their sum (1/2, 3/2), and each projection is orthogonal to the other original gradient."""
    G = torch.stack([t(1, 0), t(-1, 1)])
    torch.testing.assert_close(project_conflicting(G, [[1], [0]]), t(0.5, 1.5), rtol=0, atol=1e-15)
    g1_pc, g2_pc = t(0.5, 0.5), t(0.0, 1.0)
    assert float(g1_pc @ G[1]) == 0 and float(g2_pc @ G[0]) == 0


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    G = torch.stack([t(1, 0, 2), t(1, 1, 0), t(0, 3, 1)])  # all pairwise dots >= 0
    for orders in ([[1, 2], [0, 2], [0, 1]], [[2, 1], [2, 0], [1, 0]]):
        torch.testing.assert_close(project_conflicting(G, orders), G.sum(0), rtol=0, atol=0)


def test_pcgrad_order_matters_with_three_exits():
    """g1 = (1, 0, 0), g2 = (0, 1, 0), g3 = (-1, -2, 1); g1.g2 = 0, g1.g3 = -1, g2.g3 = -2, |g3|^2 = 6.
    g1 against g3 then g2: g1 + g3/6 = (5/6, -1/3, 1/6), whose dot with g2 is -1/3: (5/6, 0, 1/6).
    g1 against g2 then g3: no conflict with g2, then (5/6, -1/3, 1/6): the order changes g1's result.
    g2 against g3 then g1: g2 + g3/3 = (-1/3, 1/3, 1/3), dot with g1 -1/3: (0, 1/3, 1/3).
    g3 against g1 then g2: (0, -2, 1), then (0, 0, 1)."""
    G = torch.stack([t(1, 0, 0), t(0, 1, 0), t(-1, -2, 1)])
    first = project_conflicting(G, [[2, 1], [2, 0], [0, 1]])
    second = project_conflicting(G, [[1, 2], [2, 0], [0, 1]])
    torch.testing.assert_close(first, t(5 / 6, 0, 1 / 6) + t(0, 1 / 3, 1 / 3) + t(0, 0, 1), rtol=0, atol=1e-15)
    torch.testing.assert_close(second, t(5 / 6, -1 / 3, 1 / 6) + t(0, 1 / 3, 1 / 3) + t(0, 0, 1), rtol=0, atol=1e-15)


def per_exit_grads(model, x, y):
    """Every exit's gradient by its own backward, by parameter name (None where it does not reach)."""
    out = []
    for k in range(model.num_exits):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x)[k], y).backward()
        out.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return out


def conflicting_setup(K=2):
    """A seeded ChainNet and batch whose exits' gradients on stage 1 conflict (asserted)."""
    for seed in range(100):
        torch.manual_seed(seed)
        model = ChainNet(K, d=3)
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
        grads = per_exit_grads(model, x, y)
        flat = [torch.cat([grads[k][n].reshape(-1) for n in ("stages.0.weight", "stages.0.bias")]) for k in range(K)]
        if float(flat[0] @ flat[1]) < -1e-3:
            return model, x, y, grads
    raise AssertionError("no conflicting seed")


def sgd_update(method, params, model, x, y):
    """The change the strategy's step makes with SGD lr 1 (no momentum, no weight decay): minus its gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    METHODS.build(method, params, model=model, optimizer=opt, total_steps=1).step(x, y, 0)
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_pcgrad_step_on_two_exits_by_hand():
    """K = 2: stage 1 is shared by both exits (projected sum), stage 2 and the heads keep their exit's own
    gradient; computed here from two separate backwards."""
    model, x, y, g = conflicting_setup()
    shared = ["stages.0.weight", "stages.0.bias"]
    g1 = torch.cat([g[0][n].reshape(-1) for n in shared])
    g2 = torch.cat([g[1][n].reshape(-1) for n in shared])
    dot = g1 @ g2
    combined = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    got = sgd_update("pcgrad", {}, model, x, y)
    torch.testing.assert_close(torch.cat([got[n].reshape(-1) for n in shared]), combined, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["stages.1.weight"], g[1]["stages.1.weight"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["heads.0.weight"], g[0]["heads.0.weight"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["heads.1.bias"], g[1]["heads.1.bias"], rtol=1e-10, atol=1e-12)


def test_pcgrad_seeded_order_is_reproducible_and_saved():
    torch.manual_seed(0)
    model = ChainNet(K=4, d=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a = METHODS.build("pcgrad", {"seed": 3}, model=model, optimizer=opt, total_steps=10)
    b = METHODS.build("pcgrad", {"seed": 3}, model=model, optimizer=opt, total_steps=10)
    assert a.orders(4) == b.orders(4)
    state = a.state_dict()
    next_orders = a.orders(4)
    c = METHODS.build("pcgrad", {"seed": 99}, model=model, optimizer=opt, total_steps=10)
    c.load_state_dict(state)
    assert c.orders(4) == next_orders
    assert all(sorted(o) == [j for j in range(4) if j != i] for i, o in enumerate(next_orders))


# --- CAGrad -----------------------------------------------------------------------------------------------

def test_cagrad_symmetric_conflict_by_hand():
    """Unit g1 = (1, 0), g2 = (-0.6, 0.8): by symmetry w = (1/2, 1/2), g_w = g0 = (0.2, 0.4), c = 0.5 |g0|,
    d = g0 + c / |g0| g0 = 1.5 g0, over 1 + 0.5^2: 1.2 g0 = (0.24, 0.48)."""
    G = torch.stack([t(1, 0), t(-0.6, 0.8)])
    torch.testing.assert_close(cagrad_direction(G, 0.5), t(0.24, 0.48), rtol=0, atol=1e-6)


def test_cagrad_boundary_solution_by_hand():
    """g1 = (1, 0), g2 = (0, 2), c = 0.5: with w = (v, 1 - v), F(v) = g_w.g0 + c|g_w| = 2 - 1.5 v
    + c sqrt(5v^2 - 8v + 4); (5v - 4) / sqrt(5v^2 - 8v + 4) <= 1 on [0, 1] and c = 0.5 sqrt(1.25) < 1.5, so
    F' < 0 and the dual picks v = 1, g_w = g1 (the weaker task). d = g0 + c g1 = (0.5 + c, 1), / 1.25."""
    G = torch.stack([t(1, 0), t(0, 2)])
    c = 0.5 * math.sqrt(1.25)
    torch.testing.assert_close(cagrad_direction(G, 0.5), t((0.5 + c) / 1.25, 1 / 1.25), rtol=0, atol=1e-6)
    torch.testing.assert_close(cagrad_direction(G, 0.5, rescale=0), t(0.5 + c, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cagrad_direction(G, 0.5, rescale=2), t(0.5 + c, 1) / 1.5, rtol=0, atol=1e-6)


def cagrad_two_by_grid(g1, g2, c_ratio):
    """CAGrad for two tasks from the dual on a fine grid of w = (v, 1 - v) (no solver), rescale 1."""
    g0 = (g1 + g2) / 2
    c = c_ratio * g0.norm()
    v = torch.linspace(0, 1, 200001, dtype=torch.float64)
    gw = v[:, None] * g1 + (1 - v[:, None]) * g2
    best = gw[torch.argmin(gw @ g0 + c * gw.norm(dim=1))]
    return (g0 + c / best.norm() * best) / (1 + c_ratio**2)


def test_cagrad_interior_solution_against_grid():
    g1, g2 = t(2.0, 0.5, 0.0), t(-1.0, 1.0, 0.5)
    got = cagrad_direction(torch.stack([g1, g2]), 0.5)
    # The reference's SLSQP call keeps scipy's default ftol (1e-6 on the objective): w to about 1e-3.
    torch.testing.assert_close(got, cagrad_two_by_grid(g1, g2, 0.5), rtol=0, atol=5e-4)
    # interior: at the optimum the direction improves both exits equally (d.g1 = d.g2, from dF/dv = 0)
    assert abs(float(got @ g1) - float(got @ g2)) < 2e-3


def test_cagrad_step_on_two_exits():
    """Shared stage: K * the conflict-averse direction (the grid solve); everything else its exit's gradient."""
    model, x, y, g = conflicting_setup()
    shared = ["stages.0.weight", "stages.0.bias"]
    g1 = torch.cat([g[0][n].reshape(-1) for n in shared])
    g2 = torch.cat([g[1][n].reshape(-1) for n in shared])
    got = sgd_update("cagrad", {}, model, x, y)
    torch.testing.assert_close(torch.cat([got[n].reshape(-1) for n in shared]), 2 * cagrad_two_by_grid(g1, g2, 0.5),
                               rtol=0, atol=5e-4 * float(g1.norm() + g2.norm()))
    torch.testing.assert_close(got["stages.1.bias"], g[1]["stages.1.bias"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["heads.0.weight"], g[0]["heads.0.weight"], rtol=1e-10, atol=1e-12)


def test_cagrad_with_c_zero_is_uniform():
    """c = 0: d = g0, times K = the sum of the exits' gradients, i.e. uniform's update (up to the
    reference's +1e-8 in c)."""
    model, x, y, _ = conflicting_setup()
    twin = ChainNet(2, d=3)
    twin.load_state_dict(model.state_dict())
    got = sgd_update("cagrad", {"c": 0.0}, model, x, y)
    want = sgd_update("uniform", {}, twin, x, y)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)


# --- training, checkpoint and resume ------------------------------------------------------------------------

DIGITS = {
    "data": {"name": "digits", "image_size": 8},
    "backbone": {"name": "tiny", "widths": [4, 8, 8]},
    "epochs": 2,
    "batch_size": 128,
    "progress": False,
    "deterministic": True,
}


def resume_equals_uninterrupted(tmp_path, method):
    raw = {**DIGITS, "method": method}
    full = train.run(validate_trial({**raw, "out_dir": str(tmp_path / "a")}))

    class Crash(Exception):
        pass

    def crash_after_first(row, run_dir):
        if row["epoch"] == 1:
            raise Crash

    cfg = validate_trial({**raw, "out_dir": str(tmp_path / "b")})
    with pytest.raises(Crash):
        train.run(cfg, on_epoch=crash_after_first)
    resumed = train.run(cfg)
    strip = ("time_s", "images_per_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed.epochs] == \
           [{k: v for k, v in e.items() if k not in strip} for e in full.epochs]
    assert resumed.exits == full.exits and resumed.budgets == full.budgets
    return full


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "pcgrad"}, {"name": "cagrad"}])
def test_surgery_resume_equals_uninterrupted(tmp_path, method):
    full = resume_equals_uninterrupted(tmp_path, method)
    assert len(full.epochs) == 2 and all(math.isfinite(e["loss"]) for e in full.epochs)
