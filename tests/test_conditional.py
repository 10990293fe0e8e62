"""Tests of conditional.py: classifier-free guidance against its definition and against the analytic
noise predictions of a Gaussian mixture, label dropping, and the command line end to end on the
tiny MNIST that conftest.py writes."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import conditional as cond
from conftest import ROOT

# A U-Net small enough that a CPU step takes milliseconds; T = 20 keeps sampling cheap.
TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "16", "--num-samples", "16", "--log-every", "5",
        "--sampling-steps", "20"]


def run_cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two cores: keep parallel processes from thrashing
    return subprocess.run([sys.executable, str(ROOT / "conditional.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=kw.pop("cwd", None), env=env, timeout=300, **kw)


def schedule(kind="linear", T=1000):
    betas = cond.make_schedule(kind, T)[0]
    return betas.float(), torch.cumprod(1 - betas, 0).float()


def random_unet(num_classes=3, seed=0):
    """A tiny U-Net whose zero-initialised head is randomised, so that its output depends on x, t and c."""
    torch.manual_seed(seed)
    model = cond.UNet(1, base=8, mult=(1, 2), num_res_blocks=1, num_classes=num_classes)
    nn.init.normal_(model.head[-1].weight, std=0.3)
    return model.eval()


class Recorder(nn.Module):
    """Wraps a model and records the batch of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.class_emb = model.class_emb

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return self.model(x, t, y)


# ---- guidance: Eq. 6 and one batched forward pass ----

def test_w0_gives_exactly_the_conditional_prediction():
    model = random_unet()
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        guided = cond.guided_eps(model, x, t, y, 0.0, null_class=3)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 3)]))
        alone = model(x, t, y)
    assert torch.equal(guided, both[:4])  # bit for bit: nothing of eps(x, null) leaks in
    assert torch.allclose(guided, alone, atol=1e-6)  # the same network on the un-doubled batch
    assert not torch.allclose(both[:4], both[4:], atol=1e-3)  # the null class does change the prediction


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_guided_eps_is_eq_6_from_one_batched_pass(w):
    model = Recorder(random_unet())
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([5, 50, 900]), torch.tensor([2, 0, 1])
    with torch.no_grad():
        guided = cond.guided_eps(model, x, t, y, w, null_class=3)
        # the references come from the same batch of 6: a batch of 3 differs from it in the last
        # bits of float32 (3.6e-6 here), which 1 + w and w amplify; that is not what this tests
        null = torch.full_like(y, 3)
        eps_c, eps_u = model.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        assert torch.allclose(eps_c, model.model(x, t, y), atol=1e-5)  # the same network alone
    assert len(model.calls) == 1  # the references above call the wrapped model directly
    xs, ts, ys = model.calls[0]
    assert torch.equal(xs, torch.cat([x, x])) and torch.equal(ts, torch.cat([t, t]))
    assert ys.tolist() == [2, 0, 1, 3, 3, 3]
    assert torch.allclose(guided, (1 + w) * eps_c - w * eps_u, atol=1e-5)
    s = 1 + w  # the "guidance scale" of other libraries: eps_u + s (eps_c - eps_u) is the same
    assert torch.allclose(guided, eps_u + s * (eps_c - eps_u), atol=1e-5)


def test_class_weights_blend_the_embeddings():
    model = random_unet(num_classes=3)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        one_hot = model(x, t, torch.nn.functional.one_hot(y, 4).float())
        assert torch.allclose(model(x, t, y), one_hot, atol=1e-6)
        half = cond.blend_labels([(0, 2)], 0.5, 3)
        assert half.tolist() == [[0.5, 0.0, 0.5, 0.0]]
        guided = cond.guided_eps(model, x[:1], t[:1], half, 1.0, null_class=3)  # blends guide too
        assert guided.shape == (1, 1, 8, 8) and torch.isfinite(guided).all()


def test_one_seed_gives_the_same_noise_for_every_w_and_label():
    """The guidance strip and the mixing grid compare w and labels on the same noise."""
    betas, alpha_bar = schedule(T=20)
    model = cond.UNet(1, base=8, mult=(1, 2), num_res_blocks=1, num_classes=3)  # zero head: eps_theta = 0
    args = ((1, 8, 8), alpha_bar, 0, 4)
    a, _ = cond.generate(model, torch.tensor([0, 1, 2, 0, 1]), 0.0, *args, 20, 1.0)
    b, _ = cond.generate(model, cond.blend_labels([(0, 1)] * 5, 0.3, 3), 4.0, *args, 20, 1.0)
    c, _ = cond.generate(model, torch.tensor([2, 2, 2, 2, 2]), 1.0, *args, 5, 0.0)
    d, _ = cond.generate(model, torch.tensor([0, 0, 0, 0, 0]), 2.0, *args, 5, 0.0)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert a.float().std() > 0 and not torch.equal(a, c)


# ---- label dropping ----

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_matches_p_uncond_per_example(p):
    gen = torch.Generator().manual_seed(0)
    n_batches, B, null = 2000, 32, 10
    y = torch.arange(B) % 10
    dropped = torch.stack([cond.drop_labels(y, p, null, gen) == null for _ in range(n_batches)]).float()
    assert abs(dropped.mean().item() - p) < 5 * (p * (1 - p) / dropped.numel()) ** 0.5
    # Per example, not per batch: each position drops at rate p, and a batch's count is Binomial(B, p).
    per_position = dropped.mean(0)
    assert (per_position - p).abs().max() < 5 * (p * (1 - p) / n_batches) ** 0.5
    counts = dropped.sum(1)
    assert abs(counts.var().item() / (B * p * (1 - p)) - 1) < 0.15
    kept = cond.drop_labels(y, p, null, gen)
    assert torch.equal(kept[kept != null], y[kept != null])  # the others keep their own label
    assert (cond.drop_labels(y, 0.0, null, gen) == y).all()


# ---- guidance on a two-class Gaussian mixture with analytic noise predictions ----

class MixtureEps(nn.Module):
    """Exact E[eps | x_t, c] for data x_0 ~ N(mu_c, s^2 I) of class c, and for the null class the
    unconditional E[eps | x_t] = sum_c p(c | x_t) E[eps | x_t, c], the mixture's posterior."""

    def __init__(self, mus, s, alpha_bar):
        super().__init__()
        self.mus, self.s, self.alpha_bar = torch.tensor(mus), s, alpha_bar
        self.class_emb = nn.Embedding(len(mus) + 1, 1)  # generate() reads the null class from it

    def forward(self, x, t, y):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        var = ab * self.s ** 2 + 1 - ab  # x_t | c ~ N(sqrt(ab) mu_c, var I)
        means = [ab.sqrt() * mu for mu in self.mus]
        eps_c = torch.stack([(1 - ab).sqrt() * (x - m) / var for m in means])  # (classes, B, ...)
        log_lik = torch.stack([(-(x - m) ** 2 / (2 * var)).flatten(1).sum(1) for m in means])  # equal priors
        post = log_lik.softmax(0).view(len(means), -1, 1, 1, 1)
        eps_u = (post * eps_c).sum(0)
        null = y == len(self.mus)
        picked = eps_c[y.clamp(max=len(self.mus) - 1), torch.arange(len(x))]
        return torch.where(null.view(-1, 1, 1, 1), eps_u, picked)


@pytest.mark.parametrize("steps,eta", [(200, 1.0), (50, 0.0)])  # Alg. 2, and DDIM
def test_guidance_raises_the_share_of_samples_on_their_class(steps, eta):
    mus, s = (-0.4, 0.4), 0.4  # overlapping classes: unguided, about 16% land on the other side of 0
    betas, alpha_bar = schedule(T=200)
    model = MixtureEps(mus, s, alpha_bar)
    labels = torch.arange(4000) % 2
    on_class = {}
    for w in (0.0, 1.0, 4.0):
        images, _ = cond.generate(model, labels, w, (1, 1, 1), alpha_bar, 0, 4000, steps, eta)
        x = images.flatten().float() / 127.5 - 1
        on_class[w] = ((x > 0).long() == labels).float().mean().item()
    # w = 0 is the conditional model: the share of N(+-0.4, 0.4^2) beyond 0 is Phi(1) = 0.841.
    assert abs(on_class[0.0] - 0.841) < 0.03
    # Guidance sharpens p(c | x_t): the share rises with w (to almost all at w = 4, where it saturates).
    assert on_class[1.0] > on_class[0.0] + 0.05 and on_class[4.0] >= on_class[1.0] and on_class[4.0] > 0.98


# ---- classifier guidance (Dhariwal & Nichol) with the exact classifier of a Gaussian mixture ----

class MixtureClassifier(nn.Module):
    """Logits of the exact p(c | x_t) for x_0 ~ N(mu_c, s^2 I), equal priors: log N(x_t; sqrt(ab) mu_c,
    var I) up to a constant that every class shares (all classes have the same var)."""

    def __init__(self, mus, s, alpha_bar):
        super().__init__()
        self.mus, self.s, self.alpha_bar = mus, s, alpha_bar

    def forward(self, x, t):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        var = ab * self.s ** 2 + 1 - ab
        return torch.stack([(-(x - ab.sqrt() * mu) ** 2 / (2 * var)).flatten(1).sum(1) for mu in self.mus], 1)


@pytest.mark.parametrize("s", [0.0, 1.0, 3.5])
def test_classifier_guided_eps_is_eq_14_in_closed_form(s):
    """eps^ = eps(x_t) - s sqrt(1 - ab) grad log p(y | x_t), with the gradient written out by hand:
    grad log p(y | x_t) = (m_y - sum_k p(k | x_t) m_k) / var, m_k = sqrt(ab) mu_k. float64 throughout."""
    mus, sd = (-0.5, 0.25), 0.375  # exactly representable, so the closed form sees the same numbers
    alpha_bar = torch.cumprod(1 - cond.make_schedule("linear", 1000)[0], 0)  # float64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 2, 2, generator=gen, dtype=torch.float64)
    t, y = torch.randint(1000, (64,), generator=gen), torch.randint(2, (64,), generator=gen)
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    var, m = ab * sd ** 2 + 1 - ab, torch.stack([ab.sqrt() * mu for mu in mus])  # m: (classes, B, 1, 1, 1)
    log_lik = torch.stack([(-(x - mk) ** 2 / (2 * var)).flatten(1).sum(1) for mk in m])
    post = log_lik.softmax(0).view(2, -1, 1, 1, 1)
    m_bar = (post * m).sum(0)
    eps_u = (1 - ab).sqrt() * (x - m_bar) / var  # the exact unconditional E[eps | x_t]
    grad = (m[y, torch.arange(64)] - m_bar) / var
    got = cond.classifier_guided_eps(eps_u, MixtureClassifier(mus, sd, alpha_bar), x, t, y, s, alpha_bar)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, eps_u - s * (1 - ab).sqrt() * grad, rtol=1e-12, atol=1e-12)
    if s == 1:  # p(x_t) p(y | x_t) = p(x_t | y) p(y): the exact class-conditional noise, Eq. 11 read backwards
        torch.testing.assert_close(got, (1 - ab).sqrt() * (x - m[y, torch.arange(64)]) / var, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("steps,eta", [(200, 1.0), (50, 0.0)])  # Alg. 2, and DDIM
def test_classifier_guidance_moves_samples_into_the_requested_component(steps, eta):
    """The unconditional model (the null class) guided by the exact classifier: s = 0 ignores the label
    (half the samples on each side), s = 1 is the conditional model (Phi(1) = 0.841 on their side), and a
    large s puts nearly all of them on the requested side."""
    mus, s = (-0.4, 0.4), 0.4
    _, alpha_bar = schedule(T=200)
    model, classifier = MixtureEps(mus, s, alpha_bar), MixtureClassifier(mus, s, alpha_bar)
    labels = torch.arange(4000) % 2
    on_class = {}
    for scale in (0.0, 1.0, 8.0):
        images, _ = cond.generate(model, labels, scale, (1, 1, 1), alpha_bar, 0, 4000, steps, eta,
                                  classifier=classifier)
        x = images.flatten().float() / 127.5 - 1
        on_class[scale] = ((x > 0).long() == labels).float().mean().item()
    assert abs(on_class[0.0] - 0.5) < 0.03 and abs(on_class[1.0] - 0.841) < 0.03
    assert on_class[8.0] > 0.98


def test_the_classifier_trains_reports_its_accuracy_and_guides_sampling(tiny_mnist, tmp_path, trained, capsys):
    common = ["--data-dir", tiny_mnist, "--out-dir", tmp_path, *TINY]
    clf = cond.main(list(map(str, common + ["--train-classifier", "--steps", "6", "--ckpt-every", "3"])))
    out = capsys.readouterr().out
    assert "a classifier of" in out and "classifier accuracy on 51 held-out images: t = 1: " in out
    assert "t = 6: " in out and "t = 11: " in out and "t = 16: " in out  # T = 20: t = 1, T/4, T/2, 3T/4
    assert not (tmp_path / "samples.png").exists()
    ckpt = torch.load(tmp_path / "classifier.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"]["train_classifier"] and "opt" in ckpt
    assert isinstance(clf, cond.Classifier) and clf(torch.zeros(2, 1, 28, 28), torch.tensor([0, 19])).shape == (2, 10)
    # It resumes like the diffusion model.
    cond.main(list(map(str, common + ["--train-classifier", "--steps", "9", "--resume"])))
    assert torch.load(tmp_path / "classifier.pt", weights_only=True)["step"] == 9
    # Guided sampling from the diffusion checkpoint, the classifier beside it.
    sampled = tmp_path / "sampled"
    cond.main(list(map(str, ["--sample-only", "--ckpt", trained, "--guidance-mode", "classifier", "--classifier",
                             tmp_path / "classifier.pt", "--guidance", "2", "--out-dir", sampled, "--labels",
                             "3,1,4", "--npz", sampled / "s.npz", "--sampling-steps", "3"])))
    assert "s = 2" in capsys.readouterr().out
    for name in ("samples.png", "guidance.png", "reverse.gif"):
        assert (sampled / name).is_file(), name
    assert not (sampled / "mixing.png").exists()  # blends are CFG's embeddings; the classifier has none
    with np.load(sampled / "s.npz") as f:
        assert f["arr_0"].shape == (3, 28, 28, 1) and f["arr_1"].tolist() == [3, 1, 4]


def test_classifier_mistakes_end_in_one_line(capsys, tmp_path, trained, tiny_mnist):
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained, "--guidance-mode", "classifier", "--out-dir",
                                tmp_path, "--sampling-steps", 20],
                       f"--guidance-mode classifier: no classifier at {tmp_path}/classifier.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained, "--guidance-mode", "classifier", "--sampling-steps",
                                20, "--classifier", trained, "--out-dir", tmp_path], "is no classifier of these images")
    expect_usage_error(capsys, ["--guidance-mode", "classifier", "--guidance", "-2"], "--guidance: must be non-neg")
    expect_usage_error(capsys, ["--guidance-mode", "guess"], "--guidance-mode: invalid choice: 'guess'")
    expect_usage_error(capsys, ["--train-classifier", "--sample-only", "--out-dir", tmp_path],
                       "--train-classifier trains: leave out --sample-only")
    expect_usage_error(capsys, ["--train-classifier", "--resume", "--classifier", trained, "--data-dir", tiny_mnist,
                                "--out-dir", tmp_path], "is not a classifier's file")
    cond.main(list(map(str, ["--data-dir", tiny_mnist, "--out-dir", tmp_path / "c", *TINY, "--train-classifier",
                             "--steps", "2"])))
    capsys.readouterr()
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "c" / "classifier.pt", "--out-dir", tmp_path],
                       "classifier.pt is a classifier's file")
    other = ["--sample-only", "--ckpt", trained, "--guidance-mode", "classifier", "--out-dir", tmp_path,
             "--sampling-steps", 20]
    cond.main(list(map(str, ["--data-dir", tiny_mnist, "--out-dir", tmp_path / "d", *TINY, "--train-classifier",
                             "--steps", "2", "--timesteps", "30"])))
    capsys.readouterr()
    expect_usage_error(capsys, other + ["--classifier", tmp_path / "d" / "classifier.pt"],
                       "is no classifier of these images and noise")


# ---- the command line, end to end ----

@pytest.mark.slow  # a real process or kernel
def test_command_line_end_to_end(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--dataset", "mnist", "--data-dir", tiny_mnist, "--out-dir", out, "--steps", 20,
                "--sample-every", 10, "--ckpt-every", 10, *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("ckpt.pt", "forward.png", "samples_000010.png", "samples.png", "reverse.gif", "guidance.png",
                 "mixing.png"):
        assert (out / name).is_file(), name
    assert "trained at step 20" in r.stdout and "in 10 classes;" in r.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "conditional" and ckpt["step"] == 20 and len(ckpt["classes"]) == 10
    assert len(ckpt["classes"]) == 10 and ckpt["ema"]["class_emb.weight"].shape[0] == 11  # 10 classes + null
    assert Image.open(out / "samples.png").size == (10 * 30 + 2, 10 * 30 + 2)  # one row per class
    assert Image.open(out / "guidance.png").size == (10 * 30 + 2, 5 * 30 + 2)  # one row per w
    assert Image.open(out / "mixing.png").size == (10 * 30 + 2, 5 * 30 + 2)  # pairs 0-5 .. 4-9

    # Sampling needs the checkpoint only: run it from elsewhere, with no data dir.
    for steps, eta, npz in ((20, 1, tmp_path / "s" / "ddpm.npz"), (5, 0, tmp_path / "s" / "ddim.npz")):
        r = run_cli("--sample-only", "--ckpt", out / "ckpt.pt", "--out-dir", tmp_path / "sampled", "--labels",
                    "3,3,7,0,9", "--npz", npz, "--device", "cpu", "--sampling-steps", steps, "--eta", eta,
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"{steps} steps, eta {eta}, {2 * steps} U-Net evaluations an image" in r.stdout
        with np.load(npz) as f:
            assert f["arr_0"].shape == (5, 28, 28, 1) and f["arr_0"].dtype == np.uint8 and f["arr_0"].std() > 0
            assert f["arr_1"].tolist() == [3, 3, 7, 0, 9]
    r = run_cli("--sample-only", "--ckpt", out / "ckpt.pt", "--out-dir", tmp_path / "cycled", "--num-samples", 23,
                "--npz", tmp_path / "c.npz", "--sampling-steps", 3, "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "c.npz")["arr_1"].tolist() == [i % 10 for i in range(23)]


@pytest.mark.slow  # bit-exact resume: three training runs
def test_resume_matches_an_uninterrupted_run(tiny_mnist, tmp_path):
    common = ["--dataset", "mnist", "--data-dir", str(tiny_mnist), *TINY, "--sample-every", "0", "--p-uncond",
              "0.3", "--no-lr-decay"]  # the cosine decay follows --steps, which the resumed run changes
    cond.main(common + ["--out-dir", str(tmp_path / "a"), "--steps", "7", "--ckpt-every", "7"])
    cond.main(common + ["--out-dir", str(tmp_path / "a"), "--steps", "15", "--resume"])
    cond.main(common + ["--out-dir", str(tmp_path / "b"), "--steps", "15"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 15
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_image_folder_with_class_sub_folders(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("cat", 3), ("dog", 4)):
        (tmp_path / "imgs" / name / "deeper").mkdir(parents=True)
        folder = tmp_path / "imgs" / name
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(folder / "deeper" / "g.jpg")
    data, labels, classes, _ = cond.load_images(str(tmp_path / "imgs"), "unused", 32)
    assert data.shape == (9, 3, 32, 32) and classes == ["cat", "dog"] and labels.tolist() == [0] * 4 + [1] * 5
    ema = cond.main(["--dataset", str(tmp_path / "imgs"), "--image-size", "32", "--out-dir", str(tmp_path / "o"),
                     "--steps", "2", "--sample-every", "0", *TINY, "--sampling-steps", "2"])
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ckpt["classes"] == ["cat", "dog"] and ema.class_emb.num_embeddings == 3


# ---- bad input: one line, exit code 2, no traceback ----

def expect_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cond.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err, err
    assert err.strip().count("\n") == 0 and err.startswith("conditional.py: error: ")


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cond.main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(out), "--steps", "3",
               "--sample-every", "0", *TINY, "--sampling-steps", "2"])
    return out / "ckpt.pt"


@pytest.mark.parametrize("argv,message", [
    (["--guidance", "-0.5"], "--guidance: must be non-negative (w = 0: the conditional model, unguided)"),
    (["--guidance", "nan"], "--guidance: must be non-negative"),
    (["--p-uncond", "1"], "--p-uncond: must be in [0, 1)"),
    (["--labels", "3,x"], "--labels: must be classes like 3,3,7"),
    (["--sampling-steps", "0"], "--sampling-steps: must be positive, got 0"),
    (["--sampling-steps", "30", "--timesteps", "20"], "--sampling-steps 30 is more than the model's T = 20"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
])
def test_bad_flags(capsys, tmp_path, argv, message):
    expect_usage_error(capsys, argv + ["--out-dir", tmp_path, "--device", "cpu"], message)


def test_label_out_of_range(capsys, tmp_path, trained, tiny_mnist):
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained, "--labels", "3,10", "--sampling-steps", "20"],
                       "class 10 is out of range; this model has classes 0..9")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained, "--labels", "-1"], "must be classes like 3,3,7, got -1")
    # When training, before the first step rather than after the last.
    expect_usage_error(capsys, ["--data-dir", tiny_mnist, "--out-dir", tmp_path, *TINY, "--labels", "12"],
                       "class 12 is out of range")
    assert not (tmp_path / "ckpt.pt").exists()


def test_folder_without_class_sub_folders(capsys, tmp_path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    expect_usage_error(capsys, ["--dataset", tmp_path / "flat", "--out-dir", tmp_path / "o"], "no class sub-folders")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    expect_usage_error(capsys, ["--dataset", tmp_path / "empty", "--out-dir", tmp_path / "o"], "holds no images")


def test_checkpoint_of_another_script(capsys, tmp_path):
    torch.save({"script": "ddpm", "config": {}, "step": 1, "image_shape": [1, 28, 28], "model": {}, "ema": {},
                "opt": {}}, tmp_path / "ddpm.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "ddpm.pt"],
                       "is not a checkpoint of conditional.py (it says 'ddpm')")
    expect_usage_error(capsys, ["--resume", "--ckpt", tmp_path / "ddpm.pt"], "is not a checkpoint of conditional.py")
    torch.save({"script": "conditional", "config": {}, "step": 1, "image_shape": [1, 28, 28], "model": {},
                "ema": {}, "opt": {}}, tmp_path / "old.pt")
    expect_usage_error(capsys, ["--sample-only", "--ckpt", tmp_path / "old.pt"], "lacks classes")


def test_resume_on_other_data_is_refused(capsys, tmp_path):
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "imgs" / name / "0.png")
    common = ["--dataset", tmp_path / "imgs", "--image-size", "28", "--out-dir", tmp_path / "o", *TINY,
              "--sample-every", "0", "--sampling-steps", "2"]
    cond.main(list(map(str, common + ["--steps", "2"])))
    capsys.readouterr()  # the training run's own output
    expect_usage_error(capsys, common + ["--resume", "--steps", "4", "--p-uncond", "0.2"], "--p-uncond 0.1, not 0.2")
    (tmp_path / "imgs" / "c").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "imgs" / "c" / "0.png")
    expect_usage_error(capsys, common + ["--resume", "--steps", "4"], "was trained on other images: the classes ['a', 'b']")


@pytest.mark.slow  # a real process or kernel
def test_bad_input_in_a_real_process_prints_one_line(tmp_path, trained):
    """The same errors through the real interpreter: exit code 2, one line, no traceback."""
    for argv in (["--guidance", "-1"], ["--sample-only", "--ckpt", trained, "--labels", "11"],
                 ["--sample-only", "--ckpt", tmp_path / "none.pt"]):
        r = run_cli(*argv, "--out-dir", tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_more_sampling_steps_than_the_checkpoints_T(capsys, trained):
    # --timesteps keeps its default of 1000 here: the limit is the T the checkpoint was trained with (20).
    expect_usage_error(capsys, ["--sample-only", "--ckpt", trained, "--device", "cpu", "--out-dir", trained.parent,
                                "--sampling-steps", "50"], "--sampling-steps 50 is more than the model's T = 20")
