"""Tests of restore.py: SDEdit against the exact posterior mean of Gaussian data, the replacement of
RePaint and ILVR against what they must keep exactly, the step against ddpm.py's Alg. 2, and the
command line on a tiny ddpm.py checkpoint."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

import conditional
import ddpm
import restore
from conftest import ROOT

TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "4", "--num-samples", "4", "--steps", "3",
        "--sample-every", "0"]


def alpha_bar_of(T=1000, dtype=torch.float64):
    return torch.cumprod(1 - restore.make_schedule("linear", T)[0], 0).to(dtype)


class GaussianEps(nn.Module):
    """The exact E[eps | x_t] for data x_0 ~ N(m, s^2 I): x_t ~ N(sqrt(ab) m, (ab s^2 + 1 - ab) I), and
    eps = -sqrt(1 - ab) grad log p_t(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) m) / (ab s^2 + 1 - ab)."""

    def __init__(self, m, s, alpha_bar):
        super().__init__()
        self.m, self.s, self.alpha_bar = m, s, alpha_bar

    def forward(self, x, t):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.m) / (ab * self.s ** 2 + 1 - ab)


def test_the_noise_level_picks_the_step_whose_noise_to_signal_is_sigma():
    alpha_bar = alpha_bar_of()
    ratio = ((1 - alpha_bar) / alpha_bar).sqrt()
    for t in (0, 57, 137, 600, 999):
        assert restore.noise_level_step(ratio[t].item(), alpha_bar) == t
    # Between two steps, the nearer one.
    assert restore.noise_level_step((0.7 * ratio[100] + 0.3 * ratio[101]).item(), alpha_bar) == 100
    assert restore.noise_level_step(1e6, alpha_bar) == 999


@pytest.mark.parametrize("every", [1, 7])
def test_sdedit_returns_the_exact_posterior_mean_of_gaussian_data(every):
    """y = x_0 + sigma n with x_0 ~ N(m, s^2 I): E[x_0 | y] = m + s^2 / (s^2 + sigma^2) (y - m). Started at
    sqrt(ab_t) y where (1 - ab_t) / ab_t = sigma^2, the reverse process with the exact noise prediction has
    that mean on every step (each step's mean is linear in x_0, and E[x_0 | x_t] is linear for Gaussian data),
    on all steps below t and on every 7th."""
    alpha_bar = alpha_bar_of()
    t_start = 140
    sigma = ((1 - alpha_bar[t_start]) / alpha_bar[t_start]).sqrt().item()
    m, s, n = 0.2, 0.3, 40000
    y = torch.tensor([-0.9, 0.0, 0.35, 1.2], dtype=torch.float64).view(1, 1, 2, 2)
    x = (alpha_bar[t_start].sqrt() * y).repeat(n, 1, 1, 1)
    ts = list(range(t_start, -1, -every))
    gen = torch.Generator().manual_seed(0)
    out = restore.restore(GaussianEps(m, s, alpha_bar), x, ts, alpha_bar, lambda x, t: x, gen, clip_x0=False)
    exact = m + s ** 2 / (s ** 2 + sigma ** 2) * (y - m)
    tolerance = 4 * out.std(0) / n ** 0.5  # four standard errors of the mean, per pixel
    assert ((out.mean(0) - exact[0]).abs() < tolerance).all(), (out.mean(0), exact[0], tolerance)
    # Not a vacuous tolerance: the noisy image itself is far outside it.
    assert ((y[0] - exact[0]).abs() > 10 * tolerance).any()


def test_a_posterior_step_between_neighbours_is_ddpms_alg_2():
    betas = ddpm.make_schedule("linear", 1000)[0]  # float64: the two forms agree to rounding
    alpha_bar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(0)
    xt, eps, z = (torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for t in (1, 300, 999):
        tt = torch.full((6,), t)
        want = ddpm.p_sample_step(xt, tt, eps, z, betas, alpha_bar)
        got = restore.posterior_step(xt, eps, alpha_bar[t], alpha_bar[t - 1], z)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The last step lands on the predicted x_0, with no noise.
    last = restore.posterior_step(xt, eps, alpha_bar[0], torch.tensor(1.0, dtype=torch.float64), z, clip_x0=False)
    torch.testing.assert_close(last, (xt - (1 - alpha_bar[0]).sqrt() * eps) / alpha_bar[0].sqrt())


def random_unet(seed=0):
    torch.manual_seed(seed)
    model = restore.UNet(1, base=8, mult=(1, 2), num_res_blocks=1)
    nn.init.normal_(model.head[-1].weight, std=0.3)  # its zero head would predict eps = 0
    return model.eval()


@pytest.mark.parametrize("kind", ["center", "left", "random"])
def test_inpainting_keeps_the_known_pixels_exactly(kind):
    alpha_bar = alpha_bar_of(20, torch.float32)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 1, 8, 8, generator=gen) * 2 - 1
    mask = restore.make_mask(kind, x0, gen)
    assert 0 < mask.mean() < 1 and set(mask.unique().tolist()) == {0.0, 1.0}
    observe = restore.agree(lambda x: mask * x, mask * x0, alpha_bar, gen)
    for resample in (1, 3):
        out = restore.restore(random_unet(), torch.randn(5, 1, 8, 8, generator=gen), list(range(19, -1, -1)),
                              alpha_bar, observe, gen, resample)
        assert torch.equal(out[mask.expand_as(out) == 1], x0[mask.expand_as(x0) == 1])
        assert (out - x0)[mask.expand_as(out) == 0].abs().max() > 0.05  # the hole is the model's
    if kind == "center":
        assert mask[0, 0, 2:6, 2:6].sum() == 0 and mask.sum() == 5 * (64 - 16)
    if kind == "left":
        assert mask[..., :4].sum() == 0 and mask[..., 4:].eq(1).all()


def test_super_resolution_keeps_the_low_frequencies_of_the_observation():
    alpha_bar = alpha_bar_of(20, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 28, 28, generator=gen)
    lp = restore.low_pass(x, 4)
    torch.testing.assert_close(restore.low_pass(lp, 4), lp, rtol=0, atol=1e-6)  # a projection
    x0 = torch.rand(3, 1, 28, 28, generator=gen) * 2 - 1
    shown, baseline, observe, t0, start = restore.corrupt("superres", x0, alpha_bar, 0.5, 4, gen)
    assert t0 == 19 and torch.equal(shown, restore.low_pass(x0, 4))
    out = restore.restore(random_unet(), start, list(range(19, -1, -1)), alpha_bar, observe, gen)
    low = torch.nn.functional.avg_pool2d(x0, 4)  # the 7x7 observation
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(out, 4), low, rtol=0, atol=1e-5)
    assert (out - restore.low_pass(out, 4)).abs().max() > 0.05  # the detail is the model's
    # The baseline is bilinear upsampling of the same 7x7 image.
    want = torch.nn.functional.interpolate(low, scale_factor=4, mode="bilinear")
    torch.testing.assert_close(baseline, want)


def test_psnr():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] = 255  # mse 255^2: 0 dB; image 1 identical: capped by the floor on the mse (100 dB)
    assert restore.psnr(b[:1], a[:1]) == pytest.approx(0.0)
    b[0] = 0
    b[0, 0, 0, 0] = 16  # mse 256 / 16 = 16: 10 log10(255^2 / 16)
    assert restore.psnr(b[:1], a[:1]) == pytest.approx(10 * torch.log10(torch.tensor(255.0 ** 2 / 16)).item())


# ---- the command line on a tiny ddpm.py checkpoint ----

@pytest.fixture(scope="module")
def tiny_ckpt(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm")
    ddpm.main(["--data-dir", str(tiny_mnist), "--out-dir", str(out), *TINY])
    return out / "ckpt.pt"


def test_every_task_end_to_end(tiny_ckpt, tiny_mnist, tmp_path, capsys):
    results = restore.main(["--ckpt", str(tiny_ckpt), "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path),
                            "--num-images", "3", "--restore-steps", "5", "--device", "cpu", "--resample", "2"])
    out = capsys.readouterr().out
    assert list(results) == list(restore.TASKS)
    for task in restore.TASKS:
        assert Image.open(tmp_path / f"{task}.png").size == (3 * 30 + 2, 3 * 30 + 2), task  # 3 rows of 3
        assert f"{task}: PSNR" in out and all(0 < v < 100 for v in results[task])
    assert "dB for bilinear upsampling" in out and "dB for the noisy image" in out


def test_a_folder_of_images_and_one_task(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (40 * i, 200, 10)).save(tmp_path / "imgs" / f"{i}.png")
    results = restore.main(["--ckpt", str(tiny_ckpt), "--images", str(tmp_path / "imgs"), "--tasks",
                            "superres,inpaint-left", "--scale", "2", "--restore-steps", "4", "--out-dir", str(tmp_path / "o"),
                            "--device", "cpu"])
    assert list(results) == ["superres", "inpaint-left"]
    assert Image.open(tmp_path / "o" / "superres.png").size == (2 * 30 + 2, 3 * 30 + 2)


def expect_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        restore.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert err.strip().count("\n") == 0 and err.startswith("restore.py: error: "), err


@pytest.mark.slow  # a real process or kernel
def test_bad_input_ends_in_one_line(tiny_ckpt, tiny_mnist, tmp_path, capsys):
    base = ["--ckpt", tiny_ckpt, "--data-dir", tiny_mnist, "--out-dir", tmp_path, "--device", "cpu"]
    expect_usage_error(capsys, base + ["--noise-std", "0"], "--noise-std: must be positive, got 0")
    expect_usage_error(capsys, base + ["--noise-std", "-1"], "--noise-std: must be positive, got -1")
    expect_usage_error(capsys, base + ["--noise-std", "nan"], "--noise-std: must be positive, got nan")
    expect_usage_error(capsys, base + ["--noise-std", "1e39"], "--noise-std: must fit float32")
    expect_usage_error(capsys, base + ["--scale", "5"], "--scale 5 does not divide the model's 28x28 images")
    expect_usage_error(capsys, base + ["--scale", "1"], "pick a divisor of 28 and 28 above 1")
    expect_usage_error(capsys, base + ["--tasks", "deblur"], "--tasks: must be some of denoise,")
    expect_usage_error(capsys, base + ["--restore-steps", "21"], "--restore-steps 21 is more than the model's T = 20")
    expect_usage_error(capsys, base + ["--images", tmp_path / "none"], "neither a dataset (mnist,")
    expect_usage_error(capsys, ["--ckpt", tmp_path / "none.pt"], "no checkpoint at")
    conditional.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "c"), *TINY, "--sampling-steps", "2"])
    capsys.readouterr()
    expect_usage_error(capsys, ["--ckpt", tmp_path / "c" / "ckpt.pt"],
                       "is not a checkpoint of ddpm.py or ddim.py (it says 'conditional')")
    # The same through the real interpreter: exit code 2, one line, no traceback.
    r = subprocess.run([sys.executable, str(ROOT / "restore.py"), "--ckpt", str(tiny_ckpt), "--scale", "3"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_test_images_take_the_models_channels(tiny_mnist, tmp_path):
    """Grey MNIST for an RGB model, and RGB files for a grey one, arrive in the model's shape."""
    rgb = restore.load_test_images("mnist", str(tiny_mnist), 3, [3, 28, 28])
    assert rgb.shape == (3, 3, 28, 28) and torch.equal(rgb[:, 0], rgb[:, 2]) and rgb.float().std() > 0
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), (30, 90, 150)).save(tmp_path / "imgs" / "a.png")
    grey = restore.load_test_images(str(tmp_path / "imgs"), "unused", 5, [1, 16, 16])
    assert grey.shape == (1, 1, 16, 16) and grey.unique().tolist() == [90]
