"""Tests of latent.py: the autoencoder's shapes and training, the latent scale factor, and the
command line of both stages end to end on a tiny MNIST that conftest.py writes."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import latent
from conftest import ROOT, make_digits

# Both stages small enough that a CPU step takes milliseconds; T = 20 keeps sampling cheap.
TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--ae-channels", "8", "--batch-size", "8", "--ae-batch-size", "8", "--sample-batch-size", "16",
        "--num-samples", "16", "--log-every", "5", "--sampling-steps", "20"]


def run_cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two cores: keep parallel processes from thrashing
    return subprocess.run([sys.executable, str(ROOT / "latent.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=kw.pop("cwd", None), env=env, timeout=300, **kw)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the autoencoder and the latent scale ----

@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 3)])
def test_encoder_and_decoder_shapes(size, channels):
    ae = latent.Autoencoder(channels, base=8, latent_channels=4)
    x = torch.randn(2, channels, size, size)
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, size // 4, size // 4)  # f = 4
    assert ae.decode(mean).shape == x.shape
    # The default single-level U-Net of stage 2 takes the latents, odd 7x7 included.
    unet = latent.UNet(4, base=8, mult=(1,), num_res_blocks=1)
    assert unet(mean, torch.tensor([0, 999])).shape == mean.shape


def test_scaled_latents_have_unit_std_on_the_data(tiny_mnist):
    data, _ = latent.load_images("mnist", tiny_mnist, 28)
    torch.manual_seed(0)
    ae = latent.Autoencoder(1, base=8, latent_channels=4)
    with torch.no_grad():  # make the raw latents far from unit std, so that the scale has work to do
        ae.encoder[-1].weight[:4] *= 30
    mean, std = latent.encode_all(ae, data, batch_size=100)
    raw = mean + std * torch.randn(mean.shape)
    assert not 0.5 < raw.std().item() < 2
    scale = latent.latent_scale(mean, std, torch.Generator().manual_seed(0))
    z = latent.get_latent_batch(mean, std, scale, 20000, torch.Generator().manual_seed(1))
    assert z.shape == (20000, 4, 7, 7)
    assert abs(z.std().item() - 1) < 0.02


def test_autoencoder_overfits_a_tiny_batch():
    torch.manual_seed(0)
    images, _ = make_digits(8, seed=0)
    x = torch.as_tensor(images)[:, None].float() / 127.5 - 1
    ae = latent.Autoencoder(1, base=16, latent_channels=4)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    mse = lambda: (ae.decode(ae.encode(x)[0]) - x).pow(2).mean().item()
    before = mse()
    for _ in range(300):
        loss = latent.ae_loss(ae, x, torch.randn(8, 4, 7, 7), kl_weight=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert mse() < 0.05 * before


def test_ae_loss_is_l1_plus_weighted_kl():
    torch.manual_seed(0)
    ae = latent.Autoencoder(1, base=8, latent_channels=4)
    x, eps = torch.rand(3, 1, 28, 28) * 2 - 1, torch.zeros(3, 4, 7, 7)
    mean, logvar = ae.encode(x)
    rec = (ae.decode(mean) - x).abs().sum() / 3  # eps = 0: z is the posterior mean
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / 3
    assert latent.ae_loss(ae, x, eps, 0.0).item() == pytest.approx(rec.item(), rel=1e-5)
    assert latent.ae_loss(ae, x, eps, 0.5).item() == pytest.approx(rec.item() + 0.5 * kl.item(), rel=1e-5)


def test_default_sampler_is_200_steps_at_eta_1_and_each_step_is_one_evaluation():
    args = latent.build_parser().parse_args([])
    latent.fill_flags(args, torch.device("cpu"))
    assert args.eta == 1 and args.sampling_steps == 200 == latent.DDIM_STEPS
    unet, ae = latent.UNet(4, base=8, mult=(1,), num_res_blocks=1), latent.Autoencoder(1, base=8)
    calls = []
    def counted(x, t):
        calls.append(len(x))
        return unet(x, t)
    for steps in (1, 7, 20):
        calls.clear()
        args = latent.argparse.Namespace(seed=0, sample_batch_size=2, sampling_steps=steps, eta=1.0)
        alpha_bar = torch.cumprod(1 - latent.make_schedule("linear", 20)[0], 0).float()
        latent.generate(counted, ae, 1.0, 2, [4, 7, 7], alpha_bar, args)
        assert calls == [2] * steps


# ---- the command line, end to end ----

@pytest.mark.slow  # a real process or kernel
def test_command_line_end_to_end(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--dataset", "mnist", "--data-dir", tiny_mnist, "--out-dir", out, "--ae-steps", 20, "--steps", 20,
                "--sample-every", 10, "--ckpt-every", 10, *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("ae.pt", "ckpt.pt", "reconstructions.png", "samples_000010.png", "samples.png", "reverse.gif"):
        assert (out / name).is_file(), name
    assert "trained at step 20: 20 steps" in r.stdout and f"checkpoint {out / 'ae.pt'}" in r.stdout
    assert f"checkpoint {out / 'ckpt.pt'}" in r.stdout and "stage 1, mnist: 512 images" in r.stdout
    assert "reconstruction MSE" in r.stdout and "PSNR" in r.stdout
    ae, ckpt = (torch.load(out / n, weights_only=True) for n in ("ae.pt", "ckpt.pt"))
    assert ae["script"] == ckpt["script"] == "latent"
    assert ae["stage"] == "autoencoder" and ae["step"] == 20 and ae["downsample_factor"] == 4
    assert ckpt["stage"] == "diffusion" and ckpt["step"] == 20
    assert ckpt["image_shape"] == [1, 28, 28] and ckpt["latent_shape"] == [4, 7, 7]
    assert ckpt["scale_factor"] > 0 and f"scale factor {ckpt['scale_factor']:.4f}" in r.stdout
    assert all(torch.equal(ckpt["ae"][k], ae["ema"][k]) for k in ae["ema"])  # stage 2 carries the autoencoder
    assert Image.open(out / "reconstructions.png").size == (8 * 30 + 2, 8 * 30 + 2)  # 4 pairs of rows
    assert Image.open(out / "reverse.gif").n_frames > 10

    # Sampling needs stage 2's checkpoint only: run it from elsewhere, with no data dir. S = T at eta 1 is
    # DDPM's Alg. 2; every sampler says how many network evaluations it made.
    arrays = {}
    for extra, name, said in ((["--sampling-steps", 20], "ddpm", "20 steps, eta 1, 20 network evaluations"),
                              (["--sampling-steps", 5, "--eta", 0], "ddim", "5 steps, eta 0, 5 network evaluations")):
        npz = tmp_path / name / "samples.npz"
        r = run_cli("--sample-only", "--ckpt", out / "ckpt.pt", "--out-dir", tmp_path / name, "--num-samples", 10,
                    "--npz", npz, "--device", "cpu", *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert said in r.stdout
        arr = np.load(npz)["arr_0"]
        assert arr.shape == (10, 28, 28, 1) and arr.dtype == np.uint8
        assert 0 < arr.std()  # not a blank image
        assert (tmp_path / name / "samples.png").is_file() and (tmp_path / name / "reverse.gif").is_file()
        arrays[name] = arr
    assert not np.array_equal(arrays["ddim"], arrays["ddpm"])  # the same seed: another sampler really ran

    # --ae-ckpt reuses stage 1: no autoencoder training, the very same weights in stage 2's checkpoint.
    r = run_cli("--dataset", "mnist", "--data-dir", tiny_mnist, "--out-dir", tmp_path / "reuse", "--steps", 5,
                "--sample-every", 0, "--ae-ckpt", out / "ae.pt", *TINY)
    assert r.returncode == 0, r.stderr
    assert "stage 1," not in r.stdout and "autoencoder: reconstruction" not in r.stdout
    assert not (tmp_path / "reuse" / "ae.pt").exists()
    reused = torch.load(tmp_path / "reuse" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(reused["ae"][k], ae["ema"][k]) for k in ae["ema"])
    assert reused["scale_factor"] == pytest.approx(ckpt["scale_factor"], rel=0.05)  # measured again, same data


@pytest.mark.slow  # a real process or kernel
@pytest.mark.parametrize("stage,name", [("autoencoder", "ae.pt"), ("diffusion", "ckpt.pt")])
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny_mnist, tmp_path, stage, name):
    common = ["--dataset", "mnist", "--data-dir", str(tiny_mnist), *TINY, "--log-every", "1", "--ckpt-every", "5",
              "--sample-every", "0", "--num-samples", "4"]
    # Stage 1's learning rate decays over --ae-steps, so every run here has the same number: enough that
    # the Ctrl-C, sent when the first checkpoint appears, lands long before the end.
    steps = ["--ae-steps", "150", "--steps", "6"] if stage == "autoencoder" else ["--ae-steps", "6", "--steps", "150"]
    interrupted = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "latent.py"), *common, *steps, "--out-dir", str(interrupted)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (interrupted / name).exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    k = torch.load(interrupted / name, weights_only=True)["step"]
    assert f"stopped at step {k}" in stdout and f"checkpoint {interrupted / name}" in stdout and 5 <= k < 150

    # Both in processes of one thread, as the interrupted run: bit-equality needs the same summation order.
    r = run_cli(*common, *steps, "--out-dir", interrupted, "--resume")
    assert r.returncode == 0, r.stderr
    r = run_cli(*common, *steps, "--out-dir", tmp_path / "straight")
    assert r.returncode == 0, r.stderr
    for f in ("ae.pt", "ckpt.pt"):
        a = torch.load(interrupted / f, weights_only=True)
        b = torch.load(tmp_path / "straight" / f, weights_only=True)
        assert a["step"] == b["step"]
        for key in ("model", "ema"):
            for param in a[key]:
                assert torch.equal(a[key][param], b[key][param]), (f, key, param)
        for i, state in a["opt"]["state"].items():
            assert torch.equal(state["exp_avg"], b["opt"]["state"][i]["exp_avg"])
    assert a["scale_factor"] == b["scale_factor"]


# ---- bad input: one line, exit code 2, no traceback, no checkpoint overwritten ----

def expect_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        latent.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err, err
    assert err.strip().count("\n") == 0 and err.startswith("latent.py: error: ")


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    latent.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(out), "--ae-steps", "3",
                 "--steps", "3", "--sample-every", "0", *TINY])
    return out


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "./no/such/folder"], "no such folder"),
    (["--image-size", "30"], "--image-size 30: the autoencoder divides it by 4"),
    (["--steps", "0"], "--steps: must be positive"),
    (["--ae-steps", "0"], "--ae-steps: must be positive"),
    (["--latent-channels", "0"], "--latent-channels: must be positive"),
    (["--ae-channels", "12"], "--ae-channels: must be a positive multiple of 8"),
    (["--kl-weight", "-1"], "--kl-weight: must be non-negative"),
    (["--sampling-steps", "2000"], "--sampling-steps 2000 is more than the model's T = 1000"),
    (["--channel-mult", "1,x"], "--channel-mult: must be positive integers"),
])
def test_bad_flags(capsys, tmp_path, argv, message):
    expect_usage_error(capsys, argv + ["--out-dir", tmp_path, "--device", "cpu"], message)


def test_autoencoder_checkpoint_that_does_not_match(capsys, tmp_path, trained, tiny_mnist):
    common = ["--data-dir", tiny_mnist, *TINY, "--out-dir", tmp_path / "o"]
    expect_usage_error(capsys, common + ["--ae-ckpt", trained / "ae.pt", "--latent-channels", "8"],
                       "was trained with --latent-channels 4, not 8: leave the flag out")
    ae = torch.load(trained / "ae.pt", weights_only=True)
    ae["downsample_factor"] = 8
    torch.save(ae, tmp_path / "f8.pt")
    expect_usage_error(capsys, common + ["--ae-ckpt", tmp_path / "f8.pt"], "has f = 8, not 4")
    expect_usage_error(capsys, common + ["--ae-ckpt", trained / "ckpt.pt"], "holds the diffusion stage")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained / "ae.pt"], "holds the autoencoder stage")
    expect_usage_error(capsys, common + ["--ae-ckpt", tmp_path / "none.pt"], "no checkpoint at")
    assert not (tmp_path / "o").exists()


def test_autoencoder_weights_that_do_not_fit(capsys, tmp_path, trained, tiny_mnist):
    # As an autoencoder of an older latent.py would be: right f and C, other layers.
    old = latent.Autoencoder(1, base=8, latent_channels=4)
    old.decoder = old.decoder[:3]
    ae = torch.load(trained / "ae.pt", weights_only=True)
    ae["model"] = ae["ema"] = old.state_dict()
    torch.save(ae, tmp_path / "old_ae.pt")
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, *TINY, "--out-dir", tmp_path / "o", "--ae-ckpt",
                                tmp_path / "old_ae.pt"], "old_ae.pt: its weights do not fit its own config")
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    ckpt["ae"] = old.state_dict()
    (tmp_path / "r").mkdir()
    torch.save(ckpt, tmp_path / "r" / "ckpt.pt")
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, *TINY, "--out-dir", tmp_path / "r", "--resume"],
                       "ckpt.pt: its weights do not fit its own config")


def test_existing_checkpoints_are_never_overwritten(capsys, trained, tiny_mnist, tmp_path):
    before = digest(trained / "ckpt.pt"), digest(trained / "ae.pt")
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, "--out-dir", trained, *TINY], "exists: pass --resume")
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, "--out-dir", trained, "--resume", *TINY,
                                "--base-channels", "16"], "was trained with --base-channels 8, not 16")
    assert (digest(trained / "ckpt.pt"), digest(trained / "ae.pt")) == before
    (tmp_path / "half").mkdir()  # stage 1 done or interrupted, no stage 2 yet
    (tmp_path / "half" / "ae.pt").write_bytes((trained / "ae.pt").read_bytes())
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, "--out-dir", tmp_path / "half", *TINY],
                       "ae.pt exists: pass --resume")
    expect_usage_error(capsys, ["--resume", "--out-dir", tmp_path / "nothing", *TINY], "no checkpoint at")


def test_checkpoint_of_another_script(capsys, tmp_path, trained):
    torch.save({"script": "ddpm", "model": {}}, tmp_path / "other.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "other.pt"], "is not a checkpoint of latent.py")
    stage2 = torch.load(trained / "ckpt.pt", weights_only=True)
    del stage2["scale_factor"]
    torch.save(stage2, tmp_path / "no_scale.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "no_scale.pt"], "lacks scale_factor")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint(capsys, tmp_path, trained, damage):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(4096) if damage == "garbage" else (trained / "ckpt.pt").read_bytes()[:20000])
    expect_usage_error(capsys, ["--sample-only", "--ckpt", bad], "corrupt or truncated")
    expect_usage_error(capsys, ["--ae-ckpt", bad, "--out-dir", tmp_path / "o"], "corrupt or truncated")


@pytest.mark.slow  # a real process or kernel
def test_bad_input_in_a_real_process_prints_one_line(tmp_path):
    """The same errors through the real interpreter: exit code 2, one line, no traceback."""
    for argv in (["--dataset", "nope"], ["--sample-only", "--ckpt", tmp_path / "none.pt"]):
        r = run_cli(*argv, "--out-dir", tmp_path)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_more_sampling_steps_than_the_checkpoints_T(capsys, trained):
    # --timesteps keeps its default of 1000 here: the limit is the T the checkpoint was trained with (20).
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained / "ckpt.pt", "--device", "cpu", "--out-dir",
                                trained, "--sampling-steps", "50"], "--sampling-steps 50 is more than the model's T = 20")
