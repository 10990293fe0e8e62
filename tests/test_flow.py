"""flow.py against what can be computed exactly. For Gaussian data x_0 ~ N(m, s^2) the velocity
that flow matching learns has a closed form, and so does its loss: v*(x, t) = E[eps - x_0 | x_t = x]
= -m + (t - (1 - t) s^2) / sigma_t^2 (x - (1 - t) m), with sigma_t^2 = (1 - t)^2 s^2 + t^2, and the
loss at v* is E_t[s^2 / sigma_t^2]. The ODE dx/dt = v* carries x_1 = z to x_0 = m + s z, so Euler's
and Heun's errors can be measured against the exact map. Then the script end to end, tiny."""
import math

import numpy as np
import pytest
import torch

import evaluate
import flow
from conftest import ROOT

M, S = 0.3, 0.5  # the data: N(0.3, 0.5^2) in one dimension


def exact_velocity(x, t):
    """v*(x, t) for x_0 ~ N(M, S^2), t a tensor broadcasting against x."""
    var_t = (1 - t) ** 2 * S**2 + t**2
    return -M + (t - (1 - t) * S**2) / var_t * (x - (1 - t) * M)


def exact_model(x, time):
    """v* as flow.py's network is called: with TIME_SCALE t, one time per image."""
    return exact_velocity(x, (time / flow.TIME_SCALE).to(x.dtype).view(-1, 1, 1, 1))


def expected_minimum(how):
    """E_t[S^2 / sigma_t^2] under the training times, by quadrature (t uniform, or z ~ N(0, 1) with
    t = sigmoid(z))."""
    def floor(t):
        return S**2 / ((1 - t) ** 2 * S**2 + t**2)
    if how == "uniform":
        t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
        return torch.trapezoid(floor(t), t).item()
    z = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    return torch.trapezoid(floor(torch.sigmoid(z)) * density, z).item()


@pytest.mark.parametrize("how", ["logit-normal", "uniform"])
def test_the_loss_at_the_exact_velocity_is_its_closed_form_minimum(how):
    """flow.py's loss_fn with v* as the network: 20 batches of 20,000 draws, their mean within 4
    standard errors of E_t[s^2 / sigma_t^2] (0.811 logit-normal, 0.785 uniform). Any other field
    costs more: v* + c adds c^2 on the same draws, up to 2c times the mean residual."""
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        x0 = M + S * torch.randn((20_000, 1, 1, 1), generator=gen, dtype=torch.float64)
        losses.append(flow.loss_fn(exact_model, x0, how, gen).item())
    mean, se = np.mean(losses), np.std(losses, ddof=1) / math.sqrt(len(losses))
    assert abs(mean - expected_minimum(how)) < 4 * se, (mean, se, expected_minimum(how))
    x0 = M + S * torch.randn((20_000, 1, 1, 1), generator=gen, dtype=torch.float64)
    at_optimum = flow.loss_fn(exact_model, x0, how, torch.Generator().manual_seed(1)).item()
    shifted = flow.loss_fn(lambda x, time: exact_model(x, time) + 0.1, x0, how,
                           torch.Generator().manual_seed(1)).item()
    assert shifted - at_optimum == pytest.approx(0.01, abs=0.005)


def ode_error(sampler, steps):
    """The largest |x_0 - (m + s z)| over z in [-3, 3] after steps steps of the sampler with v*."""
    z = torch.linspace(-3, 3, 61, dtype=torch.float64).view(-1, 1, 1, 1)
    x0, _ = flow.sample_loop(exact_model, z, steps, sampler)
    return (x0 - (M + S * z)).abs().max().item()


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_euler_and_heun_carry_noise_to_the_data_at_their_order(sampler, order):
    """Errors at N = 10, 20, 40, 80 steps, float64; the measured slopes log2(e_N / e_2N) are Euler
    0.95, 0.98, 0.99 and Heun 2.12, 2.07, 2.04 (its last step, Euler's, costs no order: one step's
    error is O(h^2)). At N = 80: 0.028 and 3.7e-4, the largest at |z| = 3."""
    errors = [ode_error(sampler, n) for n in (10, 20, 40, 80)]
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(slope - order) < 0.15 for slope in slopes), (errors, slopes)
    assert errors[-1] < (0.03 if order == 1 else 4e-4)


def test_heun_costs_two_evaluations_a_step_but_the_last():
    calls = []
    def counting(x, time):
        calls.append(time[0].item() / flow.TIME_SCALE)
        return exact_model(x, time)
    flow.sample_loop(counting, torch.zeros(2, 1, 1, 1, dtype=torch.float64), 4, "heun")
    assert len(calls) == flow.evaluations("heun", 4) == 7
    assert calls == pytest.approx([1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])  # none at t = 0
    calls.clear()
    flow.sample_loop(counting, torch.zeros(2, 1, 1, 1, dtype=torch.float64), 4, "euler")
    assert calls == pytest.approx([1, 0.75, 0.5, 0.25]) and flow.evaluations("euler", 4) == 4


def test_the_path_and_the_training_times():
    x0, eps = torch.full((3, 1, 2, 2), 0.8), torch.full((3, 1, 2, 2), -2.0)
    xt = flow.interpolate(x0, torch.tensor([0.0, 0.25, 1.0]), eps)
    assert xt[:, 0, 0, 0].tolist() == pytest.approx([0.8, 0.1, -2.0])
    gen = torch.Generator().manual_seed(0)
    t = flow.sample_t(100_000, "logit-normal", gen, "cpu")
    logit = torch.log(t / (1 - t))  # N(0, 1) if t is logit-normal
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02
    u = flow.sample_t(100_000, "uniform", gen, "cpu")
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.002


TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--batch-size", "8",
        "--sample-batch-size", "16", "--num-samples", "4", "--log-every", "2", "--sample-every", "0",
        "--no-lr-decay"]  # so that a run of 2 steps follows the learning rates of one of 4


@pytest.mark.slow  # bit-exact resume: three training runs
def test_train_sample_resume_and_npz(tiny_mnist, tmp_path, capsys):
    """Trained, the outputs of the others; resumed from step 2 it ends with the weights of an unbroken
    run; sampled, it prints its evaluations, and evaluate.py reads its --npz."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    flow.main(["--data-dir", str(tiny_mnist), "--out-dir", str(whole), *TINY, "--steps", "4",
               "--t-sampling", "uniform"])
    for name in ("ckpt.pt", "log.csv", "samples.png", "reverse.gif", "forward.png"):
        assert (whole / name).is_file(), name
    flow.main(["--data-dir", str(tiny_mnist), "--out-dir", str(split), *TINY, "--steps", "2",
               "--t-sampling", "uniform"])
    flow.main(["--data-dir", str(tiny_mnist), "--out-dir", str(split), *TINY, "--steps", "4", "--resume"])
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (whole, split))
    assert b["config"]["t_sampling"] == "uniform"  # the checkpoint fixes it on --resume
    for name, weight in a["ema"].items():
        assert torch.equal(weight, b["ema"][name]), name
    capsys.readouterr()
    flow.main(["--sample-only", "--ckpt", str(whole / "ckpt.pt"), "--out-dir", str(tmp_path / "s"),
               "--sampler", "euler", "--sampling-steps", "3", "--num-samples", "4", "--npz", str(tmp_path / "s.npz")])
    assert "euler, 3 steps, 3 network evaluations an image" in capsys.readouterr().out
    images, labels = evaluate.load_samples(tmp_path / "s.npz")
    assert images.shape == (4, 28, 28, 1) and images.dtype == np.uint8 and labels is None


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "rk4"], "argument --sampler: invalid choice: 'rk4'"),
    (["--t-sampling", "normal"], "argument --t-sampling: invalid choice: 'normal'"),
    (["--sampling-steps", "0"], "--sampling-steps: must be positive, got 0"),
    (["--sample-only", "--ckpt", str(ROOT / "checkpoints" / "ddpm_mnist.pt")],
     "is not a checkpoint of flow.py (it says 'ddpm')"),
])
def test_mistakes_end_in_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        flow.main([*argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_checkpoint_fixes_its_training_times(tiny_mnist, tmp_path, capsys):
    flow.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *TINY, "--steps", "2"])
    with pytest.raises(SystemExit) as e:
        flow.main(["--sample-only", "--ckpt", str(tmp_path / "ckpt.pt"), "--t-sampling", "uniform",
                   "--out-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "was trained with --t-sampling logit-normal, not uniform" in err
