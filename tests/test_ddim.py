"""Tests of ddim.py: the DDIM update against DDPM's step and against an analytic model of
Gaussian data, inversion, ddpm.py checkpoints, and bad input. The training loop is
ddpm.py's, tested there; test_shared.py holds the two copies of it identical."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddim
import ddpm
from conftest import ROOT

# A U-Net small enough that a CPU step takes milliseconds; T = 20 keeps sampling cheap.
TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "16", "--num-samples", "16", "--log-every", "5",
        "--sampling-steps", "10"]


def run_cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two cores: keep parallel processes from thrashing
    return subprocess.run([sys.executable, str(ROOT / "ddim.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=kw.pop("cwd", None), env=env, timeout=300, **kw)


def schedule(kind="linear", T=1000):
    betas = ddim.make_schedule(kind, T)[0]
    return betas.float(), torch.cumprod(1 - betas, 0).float()


def gaussian_eps(mu, s, alpha_bar):
    """For data N(mu, s^2 I), x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), and E[eps | x_t] is linear in x_t."""
    def model(x, t):
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s ** 2 + 1 - ab)
    return model


# ---- the sub-sequence of steps ----

@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("T", [20, 1000])
def test_every_sub_sequence_is_valid(spacing, T):
    for S in range(1, T + 1):
        tau = ddim.sampling_timesteps(T, S, spacing)
        assert len(tau) == S and tau[-1] == T - 1 and tau[0] >= 0, S
        assert (tau[1:] > tau[:-1]).all(), S
    assert torch.equal(ddim.sampling_timesteps(T, T, spacing), torch.arange(T))


def test_spacings_differ_as_described():
    uniform, quadratic = ddim.sampling_timesteps(1000, 10), ddim.sampling_timesteps(1000, 10, "quadratic")
    assert uniform.tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert quadratic.tolist() == [9, 39, 89, 159, 249, 359, 489, 639, 809, 999]  # (i / 10)^2 * 1000 - 1


# ---- one step: DDIM with eta = 1 on consecutive steps is DDPM's step ----

def test_eta_1_on_consecutive_steps_is_ddpms_posterior_step():
    betas = ddim.make_schedule("linear", 1000)[0]  # float64: at t = 1, 1 - alpha_bar is 1e-4 and float32 rounds
    alpha_bar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(0)
    for clip in (False, True):
        for i in (0, 1, 7, 300, 999):
            xt, eps = (torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 for _ in range(2))
            t = torch.full((4,), i)
            ab, ab_prev = alpha_bar[i], alpha_bar[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
            sigma = ddim.ddim_sigma(ab, ab_prev, 1.0)
            zero = torch.zeros_like(xt)
            mean = ddim.ddim_step(xt, eps, ab, ab_prev, sigma, zero, clip)
            ddpm_mean = ddpm.p_sample_step(xt, t, eps, zero, betas, alpha_bar, "posterior", clip)
            _, ddpm_var = ddpm.q_posterior(xt, xt, t, betas, alpha_bar)
            assert torch.allclose(mean, ddpm_mean, atol=1e-9), (i, clip)
            # the same noise scale: sigma^2 is DDPM's beta_tilde_t (zero at the last step)
            assert torch.allclose(sigma ** 2, ddpm_var[0].flatten()[0], rtol=1e-9, atol=1e-15), i
            z = torch.randn(xt.shape, generator=gen, dtype=torch.float64)
            assert torch.allclose(ddim.ddim_step(xt, eps, ab, ab_prev, sigma, z, clip) - mean, sigma * z)


def test_eta_0_adds_no_noise():
    _, alpha_bar = schedule()
    ab, ab_prev = alpha_bar[500], alpha_bar[400]
    assert ddim.ddim_sigma(ab, ab_prev, 0.0) == 0
    assert 0 < ddim.ddim_sigma(ab, ab_prev, 0.5) < ddim.ddim_sigma(ab, ab_prev, 1.0)


# ---- the whole sampler, driven by the exact noise prediction for Gaussian data ----

def euler_std(s, alpha_bar, taus):
    """The std that eta = 0 DDIM must give for data N(mu, s^2), in closed form. With y = x / sqrt(ab) and
    sig = sqrt(1 - ab) / sqrt(ab), Eq. 12 at eta = 0 is the Euler step y' = y + (sig' - sig) eps, and the exact
    eps of Gaussian data is sig (y - mu) / (s^2 + sig^2): each step scales y - mu by a known factor."""
    ab = alpha_bar.double()[taus.flip(0)].tolist() + [1.0]
    sig = [((1 - a) / a) ** 0.5 for a in ab]
    factor = math.prod(1 + (sig[i + 1] - sig[i]) * sig[i] / (s ** 2 + sig[i] ** 2) for i in range(len(taus)))
    return factor / ab[0] ** 0.5  # x_T ~ N(0, 1) is y with std 1 / sqrt(ab_T)


@pytest.mark.parametrize("S,spacing", [(10, "uniform"), (10, "quadratic"), (50, "uniform"), (1000, "uniform")])
def test_deterministic_sampler_on_gaussian_data(S, spacing):
    mu, s = 0.3, 0.5
    _, alpha_bar = schedule()
    x = torch.randn(10000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    taus = ddim.sampling_timesteps(1000, S, spacing)
    out, frames = ddim.ddim_sample_loop(gaussian_eps(mu, s, alpha_bar), x, alpha_bar, taus, 0.0, n_frames=5,
                                        clip_x0=False)
    assert abs(out.mean().item() - mu) < 0.01  # standard error is 0.002
    # The std is that of S Euler steps of the ODE, to sampling error; it tends to s as S grows.
    # Few steps shrink it (by 15-26% at S = 10): first-order error, the cost of skipping steps.
    assert out.std().item() == pytest.approx(euler_std(s, alpha_bar, taus), rel=0.015)
    assert abs(euler_std(s, alpha_bar, taus) / s - 1) < {10: 0.3, 50: 0.06, 1000: 0.005}[S]
    assert len(frames) == 5


def test_eta_1_with_every_step_reproduces_gaussian_data():
    mu, s = 0.3, 0.5
    _, alpha_bar = schedule()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, 2, 2, generator=gen)
    out, _ = ddim.ddim_sample_loop(gaussian_eps(mu, s, alpha_bar), x, alpha_bar, torch.arange(1000), 1.0, gen,
                                   clip_x0=False)
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() / s - 1) < 0.03  # DDPM's sampler


def test_eta_0_is_deterministic_and_eta_1_is_not():
    _, alpha_bar = schedule()
    model, x = gaussian_eps(0.3, 0.5, alpha_bar), torch.randn(8, 1, 2, 2)
    taus = ddim.sampling_timesteps(1000, 20)
    run = lambda eta, seed: ddim.ddim_sample_loop(model, x, alpha_bar, taus, eta,
                                                  torch.Generator().manual_seed(seed), clip_x0=False)[0]
    assert torch.equal(run(0.0, 0), run(0.0, 1))
    assert not torch.allclose(run(1.0, 0), run(1.0, 1))


def test_inversion_then_decoding_returns_the_original():
    mu, s = 0.3, 0.5
    _, alpha_bar = schedule()
    model = gaussian_eps(mu, s, alpha_bar)
    x0 = mu + s * torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    rmse = {}
    for S in (50, 200, 1000):
        taus = ddim.sampling_timesteps(1000, S)
        xT = ddim.ddim_invert(model, x0, alpha_bar, taus)
        assert abs(xT.std().item() - 1) < 0.05  # the encoding looks like the Gaussian x_T it should be
        rec, _ = ddim.ddim_sample_loop(model, xT, alpha_bar, taus, 0.0, clip_x0=False)
        rmse[S] = (rec - x0).pow(2).mean().sqrt().item()
    # Encoding and decoding are first-order schemes: the round trip's error falls as 1 / S (DDIM Table 2's
    # trend), to 0.6% of the data's std at S = 1000.
    assert rmse[1000] < 0.003 < 0.01 < rmse[200] < 0.02 < rmse[50] < 0.06, rmse


def test_the_inversion_figure_decodes_by_the_steps_it_encodes_with(tmp_path):
    """save_inversion once decoded with x_0 clipped, where ddim_invert encodes without: not the
    encoder's inverse once predictions pass [-1, 1], so more steps did not help (MNIST, 45,000 steps:
    RMSE 85 and 44 grey levels at S = 50 and 1000). Here x_0 predictions pass 1 (data mean 1.5)."""
    _, alpha_bar = schedule()
    model = gaussian_eps(1.5, 0.5, alpha_bar)
    data = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rmse = {S: ddim.save_inversion(model, data, alpha_bar, ddim.sampling_timesteps(1000, S),
                                   tmp_path / f"{S}.png")[0] for S in (200, 1000)}
    assert rmse[1000] < 2 and rmse[1000] < rmse[200] / 3, rmse  # clipped: 11.8 and 9.5 grey levels


def test_slerp_keeps_the_norm_and_the_ends():
    gen = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 28, 28, generator=gen), torch.randn(1, 28, 28, generator=gen)
    assert torch.allclose(ddim.slerp(z0, z1, 0.0), z0, atol=1e-5)
    assert torch.allclose(ddim.slerp(z0, z1, 1.0), z1, atol=1e-5)
    mid = ddim.slerp(z0, z1, 0.5)
    assert abs(mid.norm() / z0.norm() - 1) < 0.05 and (0.5 * (z0 + z1)).norm() / z0.norm() < 0.8


# ---- the command line, end to end ----

@pytest.mark.slow  # a real process or kernel
def test_command_line_end_to_end(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--dataset", "mnist", "--data-dir", tiny_mnist, "--out-dir", out, "--steps", 10,
                "--sample-every", 5, *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("ckpt.pt", "forward.png", "samples_000005.png", "samples.png", "reverse.gif",
                 "interpolation.png", "inversion.png"):
        assert (out / name).is_file(), name
    assert "DDIM, eta 0, 10 steps, 10 network evaluations an image" in r.stdout and "RMSE" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["script"] == "ddim"
    assert Image.open(out / "interpolation.png").size == (10 * 30 + 2, 4 * 30 + 2)
    assert Image.open(out / "inversion.png").size == (8 * 30 + 2, 4 * 30 + 2)


def test_samples_from_a_ddpm_checkpoint(tiny_mnist, tmp_path):
    ddpm.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "ddpm"),
               "--steps", "3", "--sample-every", "0", *TINY[:-2]])
    npz = tmp_path / "samples.npz"
    model = ddim.main(["--sample-only", "--ckpt", str(tmp_path / "ddpm" / "ckpt.pt"), "--out-dir",
                       str(tmp_path / "ddim"), "--npz", str(npz), "--data-dir", str(tiny_mnist), *TINY])
    state = torch.load(tmp_path / "ddpm" / "ckpt.pt", weights_only=True)["ema"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (16, 28, 28, 1) and arr.dtype == np.uint8 and arr.std() > 0
    assert (tmp_path / "ddim" / "inversion.png").is_file()


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    ddim.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(out), "--steps", "3",
               "--sample-every", "0", *TINY])
    return out / "ckpt.pt"


# ---- bad input: one line, exit code 2, no traceback ----

def expect_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        ddim.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err, err
    assert err.strip().count("\n") == 0 and err.startswith("ddim.py: error: ")


@pytest.mark.parametrize("argv,message", [
    (["--sampling-steps", "0"], "--sampling-steps: must be positive, got 0"),
    (["--sampling-steps", "21"], "--sampling-steps 21 is more than the model's T = 20"),
    (["--eta", "-0.5"], "--eta: must be in [0, 1], got -0.5"),
    (["--eta", "1.5"], "--eta: must be in [0, 1], got 1.5"),
    (["--eta", "nan"], "--eta: must be in [0, 1], got nan"),
    (["--schedule", "cosine"], "was trained with --schedule linear, not cosine"),
    (["--timesteps", "50"], "was trained with --timesteps 20, not 50"),
    (["--base-channels", "24"], "was trained with --base-channels 8, not 24"),
])
def test_bad_sampling_flags(capsys, trained, argv, message):
    base = ["--sample-only", "--ckpt", trained, "--device", "cpu", "--out-dir", trained.parent]
    expect_usage_error(capsys, base + argv, message)


def test_checkpoint_that_does_not_fit(capsys, tmp_path, trained):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["config"]["num_res_blocks"] = 2  # weights of one model, config of another
    torch.save(ckpt, tmp_path / "mixed.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "mixed.pt", "--device", "cpu",
                                "--sampling-steps", "10"],
                       "its weights do not fit its own config")
    torch.save({"script": "conditional", "model": {}}, tmp_path / "other.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "other.pt"],
                       "is not a checkpoint of ddim.py or ddpm.py")


@pytest.mark.slow  # a real process or kernel
def test_bad_input_in_a_real_process_prints_one_line(tmp_path):
    r = run_cli("--sample-only", "--ckpt", tmp_path / "none.pt", "--out-dir", tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_resuming_a_ddpm_checkpoint_leaves_it_to_ddpm(capsys, tiny_mnist, tmp_path):
    """ddim.py samples ddpm.py's checkpoints, but resuming one would rewrite it as ddim.py's (after
    which ddpm.py would refuse its own run): it is refused, and the checkpoint is unchanged."""
    ddpm.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), "--steps", "3",
               "--sample-every", "0", *TINY[:-2]])
    before, _ = (tmp_path / "ckpt.pt").read_bytes(), capsys.readouterr()
    expect_usage_error(capsys, ["--resume", "--out-dir", tmp_path, "--steps", "6", "--data-dir", tiny_mnist, *TINY],
                       "is not a checkpoint of ddim.py (it says 'ddpm')")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert ddpm.main(["--resume", "--out-dir", str(tmp_path), "--steps", "6", "--data-dir", str(tiny_mnist),
                      "--sample-every", "0", *TINY[:-2]]) is not None  # still ddpm.py's to resume
