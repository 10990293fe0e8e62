"""Tests of evaluate.py on a tiny synthetic MNIST that the tests write themselves.

The classifier trains once per session (3000 images, a few seconds); the metric functions are
also checked on their own against closed forms and Monte Carlo.
"""
import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from conftest import ROOT, write_mnist

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = write_mnist(root / "data", n_train=3000, n_test=1000, seed=0)
    clf = evaluate.get_classifier("mnist", data, root / "cache", "cpu", seed=0)
    train_x, train_y, test_x, test_y = evaluate.load_dataset("mnist", data)
    return SimpleNamespace(root=root, data=data, cache=root / "cache", clf=clf, train_x=train_x,
                           train_y=train_y, test_x=test_x, test_y=test_y)


def features(env, images):
    return evaluate.extract_features(env.clf["model"], images, "cpu")


def evaluate_images(env, images, labels=None):
    return evaluate.evaluate_images(np.asarray(images), labels, "mnist", env.data, env.cache, "cpu")


# %% Metric functions on their own
def test_fid_matches_closed_form_and_another_route():
    g = torch.Generator().manual_seed(0)
    d, n = 6, 200_000
    sd_a, sd_b = torch.linspace(0.5, 2, d), torch.linspace(2, 0.5, d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * sd_a
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * sd_b + 1
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2
    exact = d * 1.0 + ((sd_a - sd_b) ** 2).sum().item()
    assert evaluate.fid(a, b) == pytest.approx(exact, rel=0.02)
    # correlated features, against tr sqrt(S_a S_b) from the eigenvalues of the non-symmetric product
    mix_a, mix_b = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    a, b = a @ mix_a, b[:5000] @ mix_b
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    other = ((a.mean(0) - b.mean(0)) ** 2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt
    assert evaluate.fid(a, b) == pytest.approx(other.item(), rel=1e-8)


def test_kid_is_unbiased_and_its_std_is_honest():
    g = torch.Generator().manual_seed(0)
    kids, stds = [], []
    for rep in range(300):  # same distribution: the truth is 0
        a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
        k, s = evaluate.kid(a, b, seed=rep)
        kids.append(k), stds.append(s)
    kids, stds = np.array(kids), np.array(stds)
    assert abs(kids.mean()) < 3 * kids.std() / math.sqrt(len(kids))
    # the reported standard error matches the spread of independent repetitions
    assert stds.mean() == pytest.approx(kids.std(), rel=0.2)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g) + 0.3
    k, s = evaluate.kid(a, b)
    assert k > 5 * s


def test_precision_recall_chunks_and_neighbours():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 5, generator=g), torch.randn(200, 5, generator=g) * 1.5
    brute = torch.cdist(real, real).sort(dim=1).values[:, 3]  # column 0 is the point itself
    assert torch.allclose(evaluate.kth_neighbour_radii(real, k=3, chunk=1000), brute)
    p, r = evaluate.precision_recall(real, fake, k=3)
    inside = (torch.cdist(fake, real) <= brute).any(1).double().mean().item()
    assert p == pytest.approx(inside)
    assert 0 < p < 1 and 0 < r < 1
    # a fake set that covers only part of the real one: recall drops, precision does not
    real = torch.randn(2000, 2, generator=g)
    p2, r2 = evaluate.precision_recall(real, real[real[:, 0] > 0])
    assert p2 > 0.95 and 0.45 < r2 < 0.6


# %% The classifier and its cache
def test_classifier_is_accurate_and_features_do_not_depend_on_the_batch(env):
    assert env.clf["trained"] and env.clf["test_accuracy"] > 0.95
    assert env.clf["ref_feats"].shape == (1000, evaluate.FEATURE_DIM)
    alone = evaluate.extract_features(env.clf["model"], env.test_x[:7], "cpu")
    assert torch.allclose(alone, env.clf["ref_feats"][:7], atol=1e-5)  # eval mode: no batch statistics
    assert (env.clf["ref_feats"].std(0) > 0).all()  # no dead feature units


def test_second_call_loads_the_cache(env, monkeypatch):
    monkeypatch.setattr(evaluate, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    again = evaluate.get_classifier("mnist", env.data, env.cache, "cpu", seed=0)
    assert not again["trained"] and again["test_accuracy"] == env.clf["test_accuracy"]
    assert torch.equal(again["ref_feats"], env.clf["ref_feats"])


@pytest.mark.parametrize("change", ["version", "data", "seed", "garbage"])
def test_stale_cache_retrains_and_says_why(env, tmp_path, monkeypatch, capsys, change):
    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    data, seed, why = env.data, 0, change
    if change == "version":
        monkeypatch.setattr(evaluate, "VERSION", evaluate.VERSION + 1)
    elif change == "data":
        data, why = write_mnist(tmp_path / "data", n_train=300, n_test=200, seed=7), "fingerprint"
    elif change == "seed":
        seed = 1
    else:
        (cache / "classifier_mnist.pt").write_bytes(b"not a checkpoint")
        why = "unreadable"
    calls = []
    monkeypatch.setattr(evaluate, "train_classifier",  # an untrained net: the point is the call
                        lambda x, *a, **k: calls.append(1) or evaluate.Classifier().eval())
    out = evaluate.get_classifier("mnist", data, cache, "cpu", seed=seed)
    assert calls == [1] and out["trained"]
    assert f"stale ({why}" in capsys.readouterr().err
    assert not evaluate.get_classifier("mnist", data, cache, "cpu", seed=seed)["trained"]


def test_fashion_mnist_loads_from_its_own_folder(tmp_path):
    write_mnist(tmp_path, n_train=20, n_test=10, folder="FashionMNIST")
    train_x, train_y, test_x, test_y = evaluate.load_dataset("fashion-mnist", tmp_path)
    assert train_x.shape == (20, 28, 28, 1) and train_x.dtype == torch.uint8 and len(test_y) == 10


# %% The metrics on images
def test_identical_sets_give_zero(env):
    r = evaluate_images(env, env.test_x)  # the reference set itself
    assert abs(r["fid"]) < 1e-6 * env.clf["floor"]["fid"]
    # KID pairs disjoint blocks of the two (shuffled) copies, so it is 0 up to its standard error
    assert abs(r["kid"]) < 3 * r["kid_std"]
    assert r["precision"] == 1 and r["recall"] == 1


def test_disjoint_real_halves_give_kid_indistinguishable_from_zero(env):
    f = features(env, env.train_x)
    k, s = evaluate.kid(f[:1500], f[1500:])
    assert abs(k) < 3 * s
    noisy = (env.train_x[1500:].float() + 60 * torch.randn(1500, 28, 28, 1)).clamp(0, 255).byte()
    k_noisy, s_noisy = evaluate.kid(f[:1500], features(env, noisy))
    assert k_noisy > 10 * s_noisy  # the test could fail: KID does see a difference


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_fid_rises_monotonically_with_degradation(env, kind):
    g = torch.Generator().manual_seed(0)
    x = env.train_x[:1000].permute(0, 3, 1, 2).float()
    fids = []
    for level in [0, 1, 2, 3, 4]:
        if kind == "blur":
            y = TF.gaussian_blur(x, kernel_size=11, sigma=0.4 * level) if level else x
        else:
            y = x + 24 * level * torch.randn(x.shape, generator=g)
        y = y.round().clamp(0, 255).byte().permute(0, 2, 3, 1)
        fids.append(evaluate.fid(env.clf["ref_feats"], features(env, y)))
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    assert fids[-1] > 10 * fids[0]


def test_precision_falls_for_noise_and_recall_for_one_class(env):
    real = evaluate_images(env, env.train_x[:1000])
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    noise = torch.randint(0, 256, (1000, 28, 28, 1), generator=torch.Generator().manual_seed(0))
    r = evaluate_images(env, noise.byte())
    assert r["precision"] < 0.1 and r["fid"] > 10 * real["fid"]
    ones = env.train_x[env.train_y == 3]
    r = evaluate_images(env, ones)
    assert r["recall"] < 0.3 and r["precision"] > 0.8  # missing modes, yet good samples
    assert r["class_counts"][3] > 0.9 * len(ones)


def test_accuracy_of_labels(env):
    r = evaluate_images(env, env.test_x, env.test_y.numpy())
    assert r["accuracy"] > 0.95 and r["accuracy"] == pytest.approx(env.clf["test_accuracy"])
    assert sum(r["class_counts"]) == 1000 and len(r["class_accuracy"]) == 10
    shuffled = np.random.default_rng(0).permutation(env.test_y.numpy())
    r = evaluate_images(env, env.test_x, shuffled)
    assert 0.05 < r["accuracy"] < 0.16


# %% The command line
def test_main_json_and_text(env, tmp_path, capsys):
    path = tmp_path / "s.npz"
    np.savez(path, env.train_x[:500, ..., 0].numpy(), env.train_y[:500].numpy())  # NHW + labels
    args = [str(path), "--dataset", "mnist", "--data-dir", str(env.data), "--cache-dir", str(env.cache),
            "--device", "cpu"]
    evaluate.main(args + ["--json"])
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object, nothing else on stdout
    for key in ["fid", "kid", "kid_std", "floor_fid", "precision", "recall", "accuracy"]:
        assert isinstance(out[key], float), key
    assert out["accuracy"] > 0.9 and out["floor_num_samples"] == 3000
    evaluate.main(args)
    text = capsys.readouterr().out
    assert "FID" in text and "floor" in text and "accuracy" in text


def bad_inputs(tmp_path):
    x = np.zeros((200, 28, 28), np.uint8)
    y = np.zeros(200, np.int64)
    files = {
        "missing": None,
        "garbage": b"this is not a zip archive",
        "npy": ("npy", x),
        "no_arr_0": {"images": x},
        "dtype": {"arr_0": x.astype(np.float32)},
        "size": {"arr_0": np.zeros((200, 32, 32), np.uint8)},
        "channels": {"arr_0": np.zeros((200, 28, 28, 3), np.uint8)},
        "few": {"arr_0": x[:50]},
        "label_range": {"arr_0": x, "arr_1": y + 10},
        "label_count": {"arr_0": x, "arr_1": y[:150]},
        "label_dtype": {"arr_0": x, "arr_1": y.astype(np.float32)},
    }
    paths = {}
    for name, content in files.items():
        p = tmp_path / f"{name}.npz"
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, tuple):
            np.save(tmp_path / "a.npy", content[1])
            (tmp_path / "a.npy").rename(p)
        elif content is not None:
            np.savez(p, **content)
        paths[name] = p
    return paths


MESSAGES = {"missing": "no such file", "garbage": "cannot read", "npy": "not an .npz archive",
            "no_arr_0": "has no arr_0 (it holds images)", "dtype": "dtype float32; expected uint8",
            "size": "needs images of 28x28x1", "channels": "needs images of 28x28x1",
            "few": f"at least {evaluate.MIN_SAMPLES}", "label_range": "labels from 10 to 10",
            "label_count": "one label per image", "label_dtype": "expected integer class labels"}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_bad_input_ends_with_one_line_and_exit_2(tmp_path, capsys, name):
    path = bad_inputs(tmp_path)[name]
    with pytest.raises(SystemExit) as e:  # checked before any data or classifier is touched
        evaluate.main([str(path), "--dataset", "mnist", "--data-dir", str(tmp_path / "none")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert MESSAGES[name] in err and len(err.strip().splitlines()) == 1


def test_missing_dataset_says_where_to_put_it(env, tmp_path, capsys, monkeypatch):
    # The download goes to a closed local port, so the test never waits on a real network.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    path = tmp_path / "s.npz"
    np.savez(path, env.test_x.numpy())
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(path), "--dataset", "mnist", "--data-dir", str(tmp_path / "nothing"),
                       "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert e.value.code == 2
    assert f"unpack its files into {tmp_path / 'nothing'}/MNIST/raw/" in capsys.readouterr().err


@pytest.mark.slow  # a real process or kernel
@pytest.mark.parametrize("name", ["missing", "dtype"])
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, name):
    path = bad_inputs(tmp_path)[name]
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(path), "--dataset", "mnist"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and MESSAGES[name] in proc.stderr
    assert proc.stderr.startswith("evaluate.py: error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--dataset", "svhn"], "invalid choice: 'svhn'"),
    (["--dataset", "mnist", "--device", "cuda"], "--device cuda: no cuda device is available here"),
])
def test_bad_flags(tmp_path, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "s.npz")] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err
