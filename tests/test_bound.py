"""Tests of ddpm.py's variational bound (Eq. 5): each term against an independent computation, and the
whole bound against the exact likelihood of data whose optimal noise prediction is known."""
import math

import pytest
import torch

import ddpm

LEVELS = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 grey levels, scaled as the data


def test_gaussian_kl_is_torchs():
    gen = torch.Generator().manual_seed(0)
    mean1, mean2 = torch.randn(2, 100, dtype=torch.float64, generator=gen)
    var1, var2 = torch.rand(2, 100, dtype=torch.float64, generator=gen) + 0.01
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean1, var1.sqrt()),
                                                 torch.distributions.Normal(mean2, var2.sqrt()))
    assert torch.allclose(ddpm.gaussian_kl(mean1, var1, mean2, var2), expected)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_each_kl_term_is_the_monte_carlo_kl(t):
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) in closed form, against the mean of
    log q - log p over 200,000 draws from q: within 4 standard errors of that mean."""
    betas, alpha_bar = ddpm.make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(t)
    x0, eps, model_mean_shift = torch.randn(3, 1, 1, 1, 1, dtype=torch.float64, generator=gen)
    tt = torch.tensor([t])
    xt = ddpm.q_sample(x0, tt, eps, alpha_bar)
    q_mean, q_var = ddpm.q_posterior(x0, xt, tt, betas, alpha_bar)
    p_mean, p_var = q_mean + 0.1 * betas[t].sqrt() * model_mean_shift, betas[t]  # sigma_t^2 = beta_t
    closed = ddpm.gaussian_kl(q_mean, q_var, p_mean, p_var).item()
    q, p = torch.distributions.Normal(q_mean, q_var.sqrt()), torch.distributions.Normal(p_mean, p_var.sqrt())
    draws = q.sample((200_000,))
    log_ratio = q.log_prob(draws) - p.log_prob(draws)
    assert abs(log_ratio.mean().item() - closed) < 4 * log_ratio.std().item() / 200_000 ** 0.5 + 1e-12


@pytest.mark.parametrize("mean", [-1.3, -1.0, -0.2, 0.0, 0.37, 1.0, 2.0])
@pytest.mark.parametrize("var", [1e-4, 1e-2, 0.5])
def test_the_decoder_sums_to_one_over_the_256_levels(mean, var):
    x0 = LEVELS.view(-1, 1, 1, 1)
    nll = ddpm.decoder_nll(x0, torch.full_like(x0, mean), torch.tensor(var, dtype=torch.float64))
    assert (-nll).exp().sum().item() == pytest.approx(1, abs=1e-9 + 256e-12)  # 1e-12: the floor of a bin


def test_the_prior_term_of_the_linear_schedule_is_near_zero():
    """L_T = KL(q(x_T | x_0) || N(0, I)) <= alpha_bar_T / 2 per dimension for x_0 in [-1, 1]: 2.0e-5 nats
    at T = 1000 (alpha_bar_T = 4.0e-5), about 3e-5 bits per dimension of an MNIST digit."""
    betas, alpha_bar = ddpm.make_schedule("linear", 1000)
    ab = alpha_bar[-1]
    prior = ddpm.gaussian_kl(ab.sqrt() * LEVELS, 1 - ab, torch.tensor(0.0), torch.tensor(1.0))
    assert 3.9e-5 < ab < 4.1e-5 and prior.min() >= 0
    assert prior.max() == pytest.approx(-0.5 * math.log(1 - ab)) and prior.max() < 2.1e-5  # at |x_0| = 1


def discretised_gaussian(m, s):
    """The probabilities of the 256 levels for N(m, s^2) binned as the decoder bins (ends to +-inf)."""
    edges = torch.cat([torch.tensor([-math.inf]), (LEVELS[1:] + LEVELS[:-1]) / 2, torch.tensor([math.inf])])
    return torch.special.ndtr((edges[1:] - m) / s) - torch.special.ndtr((edges[:-1] - m) / s)


def bound_of_gaussian_data(T, m, s, n):
    """The bound's mean and standard error in nats per image over n draws of the discretised data,
    with the exact eps of N(m, s^2) as the model, for each sigma choice."""
    betas, alpha_bar = ddpm.make_schedule("linear", T)
    ab32 = alpha_bar.float()
    def model(x, t):
        ab = ab32[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s ** 2 + 1 - ab)
    gen = torch.Generator().manual_seed(T)
    x0 = LEVELS[torch.multinomial(discretised_gaussian(m, s), n, replacement=True, generator=gen)]
    terms = ddpm.vlb_terms(model, x0.view(-1, 1, 1, 1), betas, alpha_bar, gen)
    return {sigma: (v.sum(1).mean().item(), v.sum(1).std().item() / n ** 0.5) for sigma, v in terms.items()}


@pytest.mark.slow
def test_the_bound_is_at_least_the_exact_nll_and_tightens_with_T():
    """One-dimensional data N(0.1, 0.4^2) on the 256 levels; its exact NLL is its entropy, 5.291 nats.
    Measured with 20,000 draws: sigma^2 = beta_tilde 6.50 (T = 100) and 5.83 (T = 1000); beta 5.318 and
    5.306 (100,000 draws: gaps 0.027 and 0.015). The gap of beta is within two standard errors here,
    so the tightening is checked on beta_tilde."""
    P = discretised_gaussian(0.1, 0.4)
    entropy = -(P * P.log()).sum().item()
    coarse, fine = bound_of_gaussian_data(100, 0.1, 0.4, 20_000), bound_of_gaussian_data(1000, 0.1, 0.4, 20_000)
    for bound in (coarse, fine):
        for mean, se in bound.values():
            assert mean > entropy - 3 * se
    assert fine["posterior"][0] < coarse["posterior"][0] - 0.3
    assert fine["beta"][0] - entropy < 0.1 and fine["beta"][0] < fine["posterior"][0]
