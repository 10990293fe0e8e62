"""Tests of ddim.py's other samplers (--sampler dpm++2m, pndm, sde) against closed forms.

For data N(mu, s^2) the optimal eps is analytic (gaussian_eps), and so is the probability-flow ODE's
map from x_T to x_0: it keeps the standard score, x_0 = mu + s (x_T - sqrt(ab_T) mu) / std(x_T). Each
ODE solver's error against that map must fall at the solver's order as S doubles."""
import math

import pytest
import torch

import ddim
from test_ddim import TINY, gaussian_eps

MU, S_DATA = 0.3, 0.5


def ode_errors(sampler, steps, spacing="quadratic"):
    """The largest error at x_0 over x_T in [-3, 3], in float64, for each S of steps."""
    alpha_bar = ddim.make_schedule("linear", 1000)[1]  # float64
    model = gaussian_eps(MU, S_DATA, alpha_bar)
    x = torch.linspace(-3, 3, 101, dtype=torch.float64).view(-1, 1, 1, 1)
    errors = []
    for S in steps:
        taus = ddim.sampling_timesteps(1000, S, spacing)
        ab_T = alpha_bar[taus[-1]]
        exact = MU + S_DATA * (x - ab_T.sqrt() * MU) / (ab_T * S_DATA ** 2 + 1 - ab_T).sqrt()
        if sampler == "ddim":
            out = ddim.ddim_sample_loop(model, x, alpha_bar, taus, 0.0, clip_x0=False)[0]
        else:
            out = ddim.solver_sample_loop(model, x, alpha_bar, taus, sampler, clip_x0=False)[0]
        errors.append((out - exact).abs().max().item())
    return errors


def slopes(errors):  # the order measured between each S and 2 S
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_ddim_is_first_order():
    errors = ode_errors("ddim", (10, 20, 40, 80, 200))
    assert all(0.9 < p < 1.05 for p in slopes(errors[:4])), slopes(errors[:4])  # measured 0.94, 0.97, 0.98
    # At S = 200 its error is still 1.3e-2: first order, error x S about constant (6.1 at 80, 6.2 at 200)
    assert errors[4] * 200 == pytest.approx(errors[3] * 80, rel=0.1)


@pytest.mark.parametrize("sampler", ["dpm++2m", "pndm"])
def test_the_higher_order_solvers_are_second_order(sampler):
    """On the quadratic grid, where sigma = sqrt(1 - ab) / sqrt(ab) is smooth in the step index near
    the data. Measured slopes over S = 10, 20, 40, 80: DPM-Solver++(2M) 1.31, 2.15, 2.45 (its first
    step and its step to x_0 are first order: they dominate at S = 10); PNDM 2.30, 3.18, 3.79."""
    errors = ode_errors(sampler, (10, 20, 40, 80, 200))
    measured = slopes(errors[:4])
    assert measured[0] > 1.2 and min(measured[1:]) >= 2, measured
    assert errors[4] < 1e-3  # at S = 200: 4.0e-5 and 1.6e-4


@pytest.mark.parametrize("sampler", ["dpm++2m", "pndm"])
def test_on_the_uniform_grid_they_converge_too(sampler):
    """On the uniform grid sigma grows as the square root of the step index near the data, and the
    errors are not monotone (measured at S = 10, 20, 40, 80: DPM-Solver++(2M) 2.9e-1, 6.5e-2, 2.7e-3,
    4.1e-3; PNDM 3.5e-2, 1.6e-3, 2.1e-3, 9.6e-4); at S = 200 both are within 1e-3."""
    errors = ode_errors(sampler, (10, 200), "uniform")
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 40


def test_the_first_step_of_each_ode_solver_is_ddims():
    """Before history exists both are first order, and first-order DPM-Solver++ is DDIM (eta = 0)."""
    alpha_bar = ddim.make_schedule("linear", 1000)[1]
    ab, ab_prev = alpha_bar[999], alpha_bar[899]
    xt, eps = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros((), dtype=torch.float64)
    expected = ddim.ddim_step(xt, eps, ab, ab_prev, zero, zero, clip_x0=False)
    for step in (ddim.dpmpp_2m_step, ddim.pndm_step):
        assert torch.allclose(step(xt, eps, ab, ab_prev, [], clip_x0=False), expected)


def test_the_step_to_x0_returns_the_prediction():
    """At ab_prev = 1 (lambda = inf) DPM-Solver++'s step is its x_0 prediction, first order."""
    ab, one = torch.tensor(0.99, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    xt, eps, x0_last = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    history = [(torch.tensor(0.5, dtype=torch.float64), x0_last)]
    out = ddim.dpmpp_2m_step(xt, eps, ab, one, history, clip_x0=False)
    assert torch.allclose(out, ddim.predict_x0(xt, eps, ab, clip_x0=False))


def test_the_adams_bashforth_formulas_integrate_polynomials_exactly():
    """Each formula sums to 1 (a constant eps is kept) and integrates t, t^2, t^3 exactly."""
    for k, coefficients in enumerate(ddim.ADAMS_BASHFORTH, 1):
        for power in range(k):  # the mean of t^p over the step [0, 1], from t = 0, -1, -2, ...
            combined = sum(c * (-j) ** power for j, c in enumerate(coefficients))
            assert combined == pytest.approx(1 / (power + 1))


def test_an_sde_step_is_an_alg_2_step_to_first_order():
    """With S = T one Euler-Maruyama step and one Alg. 2 step (its mean) differ by O(beta^2)."""
    betas, alpha_bar = ddim.make_schedule("linear", 1000)
    xt, eps = torch.randn(2, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for t in (1, 100, 500, 999):
        ab, ab_prev, beta = alpha_bar[t], alpha_bar[t - 1], betas[t]
        em = ddim.sde_step(xt, eps, ab, ab_prev, torch.zeros_like(xt), clip_x0=False)
        alg2 = (xt - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()  # DDPM Alg. 2 line 4, mean
        assert (em - alg2).abs().max() < 5 * beta ** 2 * (1 + 1 / (1 - ab))


@pytest.mark.slow
def test_the_sde_sampler_reproduces_gaussian_data():
    """1e5 one-dimensional samples at S = 1,000: mean and variance within 3 standard errors. At S = 20
    the same sampler is biased (measured: mean 0.294, variance 0.287 against 0.25: 15% too wide)."""
    alpha_bar = ddim.make_schedule("linear", 1000)[1].float()
    model, n = gaussian_eps(MU, S_DATA, alpha_bar), 100_000
    results = {}
    for S in (1000, 20):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 1, 1, generator=gen)
        taus = ddim.sampling_timesteps(1000, S)
        out = ddim.solver_sample_loop(model, x, alpha_bar, taus, "sde", gen, clip_x0=False)[0].double()
        results[S] = (out.mean().item(), out.var().item())
    se_mean, se_var = S_DATA / n ** 0.5, S_DATA ** 2 * (2 / (n - 1)) ** 0.5
    mean, var = results[1000]
    assert abs(mean - MU) < 3 * se_mean and abs(var - S_DATA ** 2) < 3 * se_var, results
    assert results[20][1] - S_DATA ** 2 > 10 * se_var, results  # the bias of 20 steps


# ---- the command line ----

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_mnist):
    out = tmp_path_factory.mktemp("samplers")
    ddim.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(out), "--steps", "2",
               *TINY])
    return out / "ckpt.pt"


@pytest.mark.parametrize("sampler", ["dpm++2m", "pndm", "sde"])
def test_each_sampler_samples_a_checkpoint(sampler, tiny_ckpt, tmp_path, capsys):
    ddim.main(["--sample-only", "--ckpt", str(tiny_ckpt), "--out-dir", str(tmp_path), "--sampler", sampler,
               "--num-samples", "16", "--sampling-steps", "5", "--data-dir", str(tmp_path)])
    assert f"{sampler}, 5 steps, 5 network evaluations an image" in capsys.readouterr().out
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "reverse.gif").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "heun"], "argument --sampler: invalid choice: 'heun'"),
    (["--sampler", "pndm", "--sampling-steps", "3"], "--sampler pndm needs --sampling-steps 4 or more"),
    (["--sampler", "dpm++2m", "--eta", "0"], "--eta is DDIM's noise: --sampler dpm++2m takes no --eta"),
])
def test_sampler_mistakes_end_in_one_line(argv, message, tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        ddim.main(["--sample-only", "--ckpt", str(tiny_ckpt), "--out-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
