"""Tests of ddpm.py: the math against closed forms, the sampler against an analytic model,
and the command line end to end on a tiny MNIST that conftest.py writes."""
import hashlib
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import ddpm
from conftest import ROOT

# A U-Net small enough that a CPU step takes milliseconds; T = 20 keeps sampling cheap.
TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "16", "--num-samples", "16", "--log-every", "5"]


def run_cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two cores: keep parallel processes from thrashing
    return subprocess.run([sys.executable, str(ROOT / "ddpm.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=kw.pop("cwd", None), env=env, timeout=300, **kw)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def schedule(kind="linear", T=1000):
    betas = ddpm.make_schedule(kind, T)[0]
    return betas, torch.cumprod(1 - betas, 0)


# ---- noise schedule and forward process ----

def test_linear_schedule_is_ddpms():
    betas, alpha_bar = schedule("linear")
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert alpha_bar[-1] < 1e-4  # x_T is almost pure noise


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [10, 20, 100, 1000])
def test_every_schedule_is_a_valid_diffusion(kind, T):
    betas, alpha_bar = schedule(kind, T)
    assert (betas > 0).all() and (betas < 1).all()  # 0 < alpha_t < 1: the step variances are valid
    assert (alpha_bar[1:] < alpha_bar[:-1]).all() and alpha_bar[-1] > 0


def test_cosine_schedule_follows_its_alpha_bar():
    T, s = 1000, 0.008
    _, alpha_bar = schedule("cosine", T)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda t: torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    # Equal except near t = T, where betas are clipped at 0.999.
    assert torch.allclose(alpha_bar[:900], expected[:900], rtol=1e-10)
    assert alpha_bar.dtype == torch.float64


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_matches_the_iterated_one_step_chain(kind):
    """x_t from t applications of q(x_t | x_{t-1}) has the moments of the closed form Eq. 4."""
    betas, alpha_bar = schedule(kind)
    n, x0_value = 20000, 0.7
    gen = torch.Generator().manual_seed(0)
    x = torch.full((n,), x0_value, dtype=torch.float64)
    x0 = torch.full((1, 1, 1, 1), x0_value, dtype=torch.float64)
    for t in range(1000):
        x = (1 - betas[t]).sqrt() * x + betas[t].sqrt() * torch.randn(n, generator=gen, dtype=torch.float64)
        if t in (0, 9, 99, 499, 999):
            tt = torch.tensor([t])
            mean = ddpm.q_sample(x0, tt, torch.zeros_like(x0), alpha_bar).item()
            std = ddpm.q_sample(x0, tt, torch.ones_like(x0), alpha_bar).item() - mean
            assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n)
            assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * n)


def test_posterior_matches_gaussian_algebra():
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on q(x_{t-1} | x_0) and q(x_t | x_{t-1})."""
    betas, alpha_bar = schedule("linear")
    t = torch.tensor([1, 10, 500, 999])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    xt = torch.randn(4, 1, 2, 2, generator=gen, dtype=torch.float64)
    mean, var = ddpm.q_posterior(x0, xt, t, betas, alpha_bar)
    ab_prev, alpha = alpha_bar[t - 1].view(-1, 1, 1, 1), (1 - betas[t]).view(-1, 1, 1, 1)
    precision = 1 / (1 - ab_prev) + alpha / (1 - alpha)  # prior precision + likelihood precision
    direct_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + alpha.sqrt() * xt / (1 - alpha)) / precision
    assert torch.allclose(var, 1 / precision, rtol=1e-10)
    assert torch.allclose(mean, direct_mean, rtol=1e-10, atol=1e-12)
    # At the paper's t = 1 the posterior is a point mass at x_0.
    mean0, var0 = ddpm.q_posterior(x0, xt, torch.zeros(4, dtype=torch.long), betas, alpha_bar)
    assert torch.allclose(mean0, x0) and (var0 == 0).all()


# ---- the sampler, driven by the exact noise prediction for Gaussian data ----

def gaussian_eps(mu, s, alpha_bar):
    """For data N(mu, s^2 I), x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), and E[eps | x_t] is linear in x_t."""
    def model(x, t):
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s ** 2 + 1 - ab)
    return model


def test_unclipped_step_mean_is_eq_11():
    betas, alpha_bar = schedule("linear")
    betas, alpha_bar = betas.float(), alpha_bar.float()
    t = torch.tensor([5, 300, 999])
    gen = torch.Generator().manual_seed(0)
    xt, eps = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    step = ddpm.p_sample_step(xt, t, eps, torch.zeros_like(xt), betas, alpha_bar, clip_x0=False)
    b, ab = betas[t].view(-1, 1, 1, 1), alpha_bar[t].view(-1, 1, 1, 1)
    eq11 = (xt - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt()
    assert torch.allclose(step, eq11, atol=1e-4)


@pytest.mark.parametrize("sigma", ["posterior", "beta"])
def test_noise_is_added_except_at_the_last_step(sigma):
    betas, alpha_bar = (s.float() for s in schedule("linear"))
    xt, eps, z = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([0, 500])
    with_z = ddpm.p_sample_step(xt, t, eps, z, betas, alpha_bar, sigma, clip_x0=False)
    without = ddpm.p_sample_step(xt, t, eps, 0 * z, betas, alpha_bar, sigma, clip_x0=False)
    assert torch.equal(with_z[0], without[0])  # Alg. 2 line 4: z = 0 when t = 1
    var = betas[500] if sigma == "beta" else betas[500] * (1 - alpha_bar[499]) / (1 - alpha_bar[500])
    assert torch.allclose(with_z[1] - without[1], var.sqrt().expand(1, 2, 2))


@pytest.mark.parametrize("sigma", ["posterior", "beta"])
def test_sampler_reproduces_gaussian_data(sigma):
    mu, s = 0.3, 0.5
    betas, alpha_bar = schedule("linear")
    betas, alpha_bar = betas.float(), alpha_bar.float()
    gen = torch.Generator().manual_seed(0)
    x, frames = ddpm.p_sample_loop(gaussian_eps(mu, s, alpha_bar), (4000, 1, 2, 2), betas, alpha_bar,
                                   sigma, gen, n_frames=5, clip_x0=False)
    assert abs(x.mean().item() - mu) < 0.02  # standard error is 0.004
    assert abs(x.std().item() / s - 1) < 0.03
    assert len(frames) == 5
    # A sampler that ignored the model would return N(0, 1): make sure this is not that.
    assert abs(x.std().item() - 1) > 0.3


# ---- the model and training ----

@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_unet_shapes(size, channels):
    model = ddpm.UNet(channels, base=8, mult=(1, 2, 2), num_res_blocks=1)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = ddpm.UNet(1, base=8, mult=(1, 2), num_res_blocks=1)
    _, alpha_bar = schedule("linear")
    alpha_bar = alpha_bar.float()
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):  # the same t and eps at every step: one batch to fit
        loss = ddpm.loss_fn(model, x0, alpha_bar, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=0.2)  # the zero-initialised head predicts eps = 0
    assert losses[-1] < 0.05 * losses[0]


# ---- the command line, end to end ----

@pytest.mark.slow  # a real process or kernel
def test_command_line_end_to_end(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--dataset", "mnist", "--data-dir", tiny_mnist, "--out-dir", out, "--steps", 20,
                "--sample-every", 10, "--ckpt-every", 10, *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("ckpt.pt", "forward.png", "samples_000010.png", "samples.png", "reverse.gif"):
        assert (out / name).is_file(), name
    assert "trained at step 20" in r.stdout and "Alg. 2, 20 steps, 20 network evaluations an image" in r.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "ddpm" and ckpt["step"] == 20 and ckpt["image_shape"] == [1, 28, 28]
    assert {"model", "ema", "opt", "config"} <= ckpt.keys()
    assert Image.open(out / "reverse.gif").n_frames > 10
    assert Image.open(out / "forward.png").size == (10 * 30 + 2, 8 * 30 + 2)  # 10 t by 8 images

    # Sampling needs the checkpoint only: run it from elsewhere, with no data dir.
    npz = tmp_path / "s" / "samples.npz"
    r = run_cli("--sample-only", "--ckpt", out / "ckpt.pt", "--out-dir", tmp_path / "sampled",
                "--num-samples", 10, "--npz", npz, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (10, 28, 28, 1) and arr.dtype == np.uint8
    assert 0 < arr.std()  # not a blank image
    assert (tmp_path / "sampled" / "samples.png").is_file() and (tmp_path / "sampled" / "reverse.gif").is_file()


@pytest.mark.slow  # a real process or kernel
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny_mnist, tmp_path):
    # The run is stopped, then resumed with a smaller --steps: a constant lr, since the cosine decay
    # (the CPU default) follows --steps, so that changing it changes the schedule.
    common = ["--dataset", "mnist", "--data-dir", tiny_mnist, *TINY, "--log-every", 1, "--ckpt-every", 5,
              "--sample-every", 0, "--no-lr-decay"]
    interrupted = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "ddpm.py"), *map(str, common), "--out-dir",
                             str(interrupted), "--steps", "100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (interrupted / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    k = torch.load(interrupted / "ckpt.pt", weights_only=True)["step"]
    assert f"stopped at step {k}" in stdout and 5 <= k < 100000

    total = k + 12
    r = run_cli(*common, "--out-dir", interrupted, "--steps", total, "--resume")
    assert r.returncode == 0, r.stderr
    r = run_cli(*common, "--out-dir", tmp_path / "straight", "--steps", total)
    assert r.returncode == 0, r.stderr
    a = torch.load(interrupted / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == total
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for i, state in a["opt"]["state"].items():
        assert torch.equal(state["exp_avg"], b["opt"]["state"][i]["exp_avg"])


@pytest.mark.slow  # a real process or kernel
def test_torchrun_two_processes_keep_identical_replicas(tiny_mnist, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import ddpm\n"
        "ema = ddpm.main(sys.argv[1:])\n"
        f"torch.save(ema.state_dict(), os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), "--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir",
                        str(tmp_path / "run"), "--steps", "15", *TINY], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 8 x 2 process(es)" in r.stdout
    w0, w1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    head = "head.2.weight"  # zero at initialisation: training moved it
    assert w0[head].abs().sum() > 0
    assert (tmp_path / "run" / "ckpt.pt").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path):
    common = ["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *TINY,
              "--sample-every", "0"]
    assert ddpm.main(common + ["--steps", "5"]) is not None
    good = digest(tmp_path / "ckpt.pt")
    handler = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, default_int_handler in a terminal
    with pytest.raises(SystemExit) as e:
        ddpm.main(common + ["--steps", "200", "--resume", "--lr", "1e30", "--warmup", "0", "--log-every", "1"])
    assert "non-finite at step" in str(e.value.code) and "last good checkpoint" in str(e.value.code)
    assert digest(tmp_path / "ckpt.pt") == good
    assert signal.getsignal(signal.SIGINT) is handler  # training's Ctrl-C handler removed on the way out


# ---- bad input: one line, exit code 2, no traceback, no checkpoint overwritten ----

def expect_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        ddpm.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err, err
    assert err.strip().count("\n") == 0 and err.startswith("ddpm.py: error: ")


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    ddpm.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(out), "--steps", "3",
               "--sample-every", "0", *TINY])
    return out / "ckpt.pt"


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "./no/such/folder"], "no such folder"),
    (["--image-size", "0"], "--image-size: must be positive, got 0"),
    (["--steps", "0"], "--steps: must be positive"),
    (["--batch-size", "-1"], "--batch-size: must be positive"),
    (["--lr", "0"], "--lr: must be positive"),
    (["--channel-mult", "1,x"], "--channel-mult: must be positive integers"),
])
def test_bad_flags(capsys, tmp_path, argv, message):
    expect_usage_error(capsys, argv + ["--out-dir", tmp_path, "--device", "cpu"], message)


def test_empty_image_folder(capsys, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    expect_usage_error(capsys, ["--dataset", tmp_path / "imgs", "--out-dir", tmp_path / "o"], "holds no images")


def test_missing_data_without_network(capsys, tmp_path, monkeypatch):
    # Point the download at a closed local port, so the test never waits on a real network.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    expect_usage_error(capsys, ["--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "o"],
                       f"could not be downloaded (RuntimeError): put its files in {tmp_path / 'empty' / 'MNIST' / 'raw'}")


def test_image_folder_trains(tmp_path):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):  # odd sizes and modes: resized and centre-cropped to 32x32 RGB
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(folder / "gray.jpg")
    ema = ddpm.main(["--dataset", str(tmp_path / "imgs"), "--image-size", "32", "--out-dir", str(tmp_path / "o"),
                     "--steps", "2", "--sample-every", "0", *TINY])
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["image_shape"] == [3, 32, 32]
    assert ema.stem.in_channels == 3


def test_existing_checkpoint_is_never_overwritten(capsys, trained, tiny_mnist):
    before = digest(trained)
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, "--out-dir", trained.parent, *TINY], "exists: pass --resume")
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, "--out-dir", trained.parent, "--resume", *TINY,
                                "--base-channels", "16"], "was trained with --base-channels 8, not 16")
    assert digest(trained) == before


def test_checkpoint_of_another_script(capsys, tmp_path):
    torch.save({"script": "latent", "model": {}}, tmp_path / "other.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "other.pt"], "is not a checkpoint of ddpm.py")
    torch.save({"script": "ddpm", "model": {}}, tmp_path / "partial.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "partial.pt"], "lacks config, ema, image_shape")


def test_output_paths_are_checked_before_any_work(capsys, tmp_path, trained):
    (tmp_path / "folder.npz").mkdir()
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained, "--npz", tmp_path / "folder.npz"], "is a folder")
    (tmp_path / "afile").write_text("")
    expect_usage_error(capsys, ["--out-dir", tmp_path / "afile"], f"cannot write {tmp_path / 'afile'}: File exists")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint(capsys, tmp_path, trained, damage):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(4096) if damage == "garbage" else trained.read_bytes()[:20000])
    expect_usage_error(capsys, ["--sample-only", "--ckpt", bad], "corrupt or truncated")
    expect_usage_error(capsys, ["--ckpt", bad, "--resume"], "corrupt or truncated")


def test_missing_checkpoint(capsys, tmp_path):
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "none.pt"], "no checkpoint at")


@pytest.mark.slow  # a real process or kernel
def test_bad_input_in_a_real_process_prints_one_line(tmp_path):
    """The same errors through the real interpreter: exit code 2, one line, no traceback."""
    for argv in (["--dataset", "nope"], ["--sample-only", "--ckpt", tmp_path / "none.pt"]):
        r = run_cli(*argv, "--out-dir", tmp_path)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# The constant rate (the CUDA default) in the full suite only: 7 s, and the quick check's 3 minutes.
@pytest.mark.parametrize("decay", [pytest.param(False, marks=pytest.mark.slow), True])
def test_learning_rate_warms_up_then_is_constant_or_decays_to_zero(tmp_path, decay):
    """The shared loop's schedule: a linear warm-up, then constant, or with --lr-decay a cosine to 0."""
    model = ddpm.UNet(1, base=8, mult=(1,), num_res_blocks=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    lrs = []
    def batch_loss(net, gen):  # records the rate that this step uses
        lrs.append(opt.param_groups[0]["lr"])
        return sum(p.sum() for p in net.parameters()) * 0
    args = ddpm.argparse.Namespace(steps=1000, lr=1e-3, warmup=100, lr_decay=decay, compile=False, seed=0,
                                   batch_size=1, log_every=100, ckpt_every=1000, sample_every=0, grad_clip=1.0,
                                   ema_decay=0.9)
    ddpm.train(model, ddpm.copy.deepcopy(model), opt, batch_loss, args, 0, tmp_path / "ckpt.pt", {})
    assert lrs[0] == pytest.approx(1e-5)  # step 1 of a 100-step warm-up
    if not decay:
        assert lrs[49] == pytest.approx(5e-4) and lrs[99:] == pytest.approx([1e-3] * 901)
    else:
        assert max(lrs) == lrs[99] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 0.099)))
        assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))  # falls from the end of the warm-up on
        assert lrs[500] == pytest.approx(0.5e-3) and 0 < lrs[-1] < 1e-8  # half way: half; the end: ~0
