"""Slim checkpoints (the EMA weights and the configuration, as checkpoints/ ships them): each script
samples from one with no dataset, --resume from one says why it cannot, and the shipped ones were
written by the committed code with its CPU defaults."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conditional
import ddim
import ddpm
import flow
import latent
from conftest import ROOT

TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "4", "--num-samples", "4", "--log-every", "5",
        "--sample-every", "0", "--steps", "3"]
EXTRA = {"latent": ["--ae-channels", "8", "--ae-batch-size", "8", "--ae-steps", "3", "--sampling-steps", "10"],
         "conditional": ["--sampling-steps", "10"], "flow": ["--sampling-steps", "3"]}
MODULES = {"ddpm": ddpm, "conditional": conditional, "latent": latent, "flow": flow}


def slim(path, to):
    """What the README's one-liner does: keep all but the training state (model and optimizer)."""
    ckpt = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("model", "opt")}, to)
    return to


@pytest.fixture(scope="module", params=sorted(MODULES))
def slim_ckpt(request, tiny_mnist, tmp_path_factory):
    name, out = request.param, tmp_path_factory.mktemp(request.param)
    tiny = [arg for arg in TINY if arg not in ("--timesteps", "20")] if name == "flow" else TINY  # no T
    MODULES[name].main(["--dataset", "mnist", "--data-dir", str(tiny_mnist), "--out-dir", str(out / "run"),
                        *tiny, *EXTRA.get(name, [])])
    return name, slim(out / "run" / "ckpt.pt", out / f"{name}_slim.pt")


def test_a_slim_checkpoint_samples_with_no_dataset(slim_ckpt, tmp_path):
    """Each script samples its own slim checkpoint; ddim.py also samples ddpm.py's."""
    name, path = slim_ckpt
    assert not {"model", "opt"} & torch.load(path, weights_only=True).keys()
    samplers = [(MODULES[name], ["--sampling-steps", "5"] if name != "ddpm" else [])]
    if name == "ddpm":
        samplers.append((ddim, ["--sampling-steps", "5"]))
    for i, (module, argv) in enumerate(samplers):
        out = tmp_path / str(i)
        module.main(["--sample-only", "--ckpt", str(path), "--out-dir", str(out), "--device", "cpu",
                     "--data-dir", str(tmp_path / "no-data"), "--num-samples", "4", *argv])
        assert Image.open(out / "samples.png").size[0] > 28


def test_resume_from_a_slim_checkpoint_says_it_holds_no_optimizer_state(slim_ckpt, tiny_mnist, tmp_path,
                                                                        capsys):
    name, path = slim_ckpt
    before = path.read_bytes()
    with pytest.raises(SystemExit) as e:
        MODULES[name].main(["--resume", "--ckpt", str(path), "--dataset", "mnist", "--data-dir",
                            str(tiny_mnist), "--out-dir", str(tmp_path), "--device", "cpu", "--steps", "6"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert f"{path} holds no optimizer state (a slim checkpoint, for sampling only)" in err
    assert path.read_bytes() == before


# ---- the checkpoints shipped in checkpoints/ ----

SHIPPED = {"ddpm_mnist.pt": ddpm, "conditional_mnist.pt": conditional, "latent_mnist.pt": latent,
           "flow_mnist.pt": flow, "ddpm_mnist_12min.pt": ddpm}  # the last: the CPU default, kept for its figures
# The recipe; --steps may differ: a shipped model may train longer than the default (README says so).
TRAINING = ("lr", "batch_size", "warmup", "lr_decay", "grad_clip", "ema_decay", "seed")
STAGE1 = ("ae_steps", "ae_batch_size", "kl_weight", "ae_ckpt")  # latent.py's autoencoder, not reused


def cpu_default(module, name):
    default = module.FLAGS[name][0]
    return default[1] if type(default) is tuple else default


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_checkpoint_is_slim_and_was_written_by_this_code_with_its_cpu_defaults(name):
    module, path = SHIPPED[name], ROOT / "checkpoints" / name
    assert path.stat().st_size <= 3e6
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["script"] == module.SCRIPT and not {"model", "opt"} & ckpt.keys()
    config = ckpt["config"]  # flags added since it was trained take their defaults when it loads
    stage1 = STAGE1 if module is latent else ()
    for flag in (*module.RUN_FLAGS, *TRAINING, *stage1):  # the model, the schedule and the recipe
        expected = 28 if flag == "image_size" else cpu_default(module, flag)
        assert config[flag] == expected, (flag, config[flag], expected)
    assert ckpt["step"] == config["steps"]  # trained to the end
    if name.endswith("_12min.pt"):
        assert config["steps"] == cpu_default(module, "steps")
    classes = [len(ckpt["classes"])] if module is conditional else []
    model = module.build_model(config, ckpt.get("latent_shape", ckpt["image_shape"])[0], *classes)
    model.load_state_dict(ckpt["ema"])  # the weights fit the configuration
    if module is latent:
        ae = latent.Autoencoder(ckpt["image_shape"][0], config["ae_channels"], config["latent_channels"])
        ae.load_state_dict(ckpt["ae"])


# ddpm.py's 1,000 steps take 19 s: slow; ddim.py samples the same checkpoint in the quick check.
@pytest.mark.parametrize("script,name,argv", [pytest.param(ddpm, "ddpm", [], marks=pytest.mark.slow),
                                              (ddim, "ddpm", ["--sampling-steps", "20", "--eta", "1"]),
                                              (conditional, "conditional", ["--sampling-steps", "20"]),
                                              (latent, "latent", ["--sampling-steps", "20"]),
                                              (flow, "flow", [])])
def test_a_shipped_checkpoint_samples_digits(script, name, argv, tmp_path):
    out = tmp_path / "out"
    script.main(["--sample-only", "--ckpt", str(ROOT / "checkpoints" / f"{name}_mnist.pt"), "--out-dir", str(out),
                 "--num-samples", "8", "--device", "cpu", "--data-dir", str(tmp_path / "none"),
                 "--npz", str(tmp_path / "s.npz"), *argv])
    images = np.load(tmp_path / "s.npz")["arr_0"]
    # MNIST is dark background with bright strokes (mean level 33 of 255, 13% of pixels over 127);
    # an untrained network gives grey noise around 128.
    assert images.shape == (8, 28, 28, 1) and images.mean() < 70 and 0.05 < (images > 127).mean() < 0.35


def test_the_shipped_classifier_guides_the_shipped_conditional_checkpoint(tmp_path):
    """checkpoints/conditional_mnist_classifier.pt: slim, trained by --train-classifier with the CPU defaults
    for the shipped conditional model's images and schedule, and it steers the null class to the labels."""
    path = ROOT / "checkpoints" / "conditional_mnist_classifier.pt"
    ckpt = torch.load(path, weights_only=True)
    assert path.stat().st_size <= 3e6 and not {"model", "opt"} & ckpt.keys()
    assert ckpt["config"]["train_classifier"]
    assert ckpt["step"] == ckpt["config"]["steps"] == cpu_default(conditional, "steps")
    out = tmp_path / "out"
    conditional.main(["--sample-only", "--ckpt", str(ROOT / "checkpoints" / "conditional_mnist.pt"), "--guidance-mode",
                      "classifier", "--classifier", str(path), "--guidance", "16", "--sampling-steps", "20",
                      "--labels", "0,1,7,0,1,7", "--out-dir", str(out), "--device", "cpu", "--npz", str(tmp_path / "s.npz")])
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (6, 28, 28, 1) and images.mean() < 70 and 0.05 < (images > 127).mean() < 0.35
