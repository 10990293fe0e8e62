"""Tests of bench.py, the measuring side: each sweep on tiny checkpoints of the scripts it imports,
and its one-line errors (a checkpoint of data that evaluate.py does not know, too few samples)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import conditional
import ddpm
import flow
import latent

TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "16", "--num-samples", "16", "--steps", "3",
        "--sample-every", "0"]


@pytest.fixture(scope="module")
def ckpts(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    common = ["--data-dir", str(tiny_mnist), *TINY]
    ddpm.main([*common, "--out-dir", str(out / "ddpm")])
    conditional.main([*common, "--out-dir", str(out / "conditional"), "--sampling-steps", "2"])
    conditional.main([*common, "--out-dir", str(out / "conditional"), "--train-classifier"])
    latent.main([*common, "--out-dir", str(out / "latent"), "--ae-channels", "8", "--ae-batch-size", "8",
                 "--ae-steps", "3", "--sampling-steps", "10"])
    return out


def run(capsys, tiny_mnist, tmp_path, *argv):
    rows = bench.main([*map(str, argv), "--samples", "130", "--sample-batch-size", "130", "--data-dir", str(tiny_mnist),
                       "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path), "--device", "cpu"])
    capsys.readouterr()
    return rows


@pytest.mark.slow  # 8 s: two tiny flow.py runs and eight rows, each scored
def test_flow_sweep_scores_each_sampler_and_checkpoint_from_the_same_noise(ckpts, tiny_mnist, tmp_path, capsys):
    common = ["--data-dir", str(tiny_mnist), *[arg for arg in TINY if arg not in ("--timesteps", "20")]]  # no T
    flow.main([*common, "--out-dir", str(tmp_path / "flow"), "--sampling-steps", "2"])
    flow.main([*common, "--out-dir", str(tmp_path / "flow_uniform"), "--sampling-steps", "2", "--t-sampling",
               "uniform"])
    paths = f"{tmp_path / 'flow' / 'ckpt.pt'},{tmp_path / 'flow_uniform' / 'ckpt.pt'}"
    rows = run(capsys, tiny_mnist, tmp_path, "flow", "--ckpt", paths, "--ddim-steps", "2,5")
    assert [(r["t_sampling"], r["sampler"], r["evaluations"]) for r in rows] == [
        (how, sampler, n) for how in ("logit-normal", "uniform") for sampler, n in
        (("euler", 2), ("euler", 5), ("heun", 1), ("heun", 5))]  # Heun: 3 steps make 5, 1 step 1
    assert all(r["fid"] > 0 and r["img_s"] > 0 and r["seed"] == 0 for r in rows)
    with pytest.raises(SystemExit):  # a ddpm.py checkpoint is not flow.py's
        run(capsys, tiny_mnist, tmp_path, "flow", "--ckpt", ckpts / "ddpm" / "ckpt.pt")


def test_ddim_sweep_scores_and_times_every_setting(ckpts, tiny_mnist, tmp_path, capsys):
    rows = run(capsys, tiny_mnist, tmp_path, "ddim-sweep", "--ckpt", ckpts / "ddpm" / "ckpt.pt")
    assert [(r["S"], r["eta"]) for r in rows] == [(10, 0.0), (20, 0.0), (10, 1.0), (20, 1.0)]  # S <= T = 20
    assert all(r["fid"] > 0 and r["img_s"] > 0 and 0 <= r["precision"] <= 1 for r in rows)
    saved = json.loads((tmp_path / "ddim-sweep.json").read_text())
    assert saved["rows"] == rows and saved["samples"] == 130
    assert (tmp_path / "ddim-sweep.txt").read_text().splitlines()[-1].startswith("130 samples per row, cpu")
    rows = run(capsys, tiny_mnist, tmp_path, "ddim-sweep", "--ckpt", ckpts / "ddpm" / "ckpt.pt", "--ddim-steps", "5")
    assert [(r["S"], r["eta"]) for r in rows] == [(5, 0.0), (5, 1.0)]  # only the S asked for


@pytest.mark.slow  # 13 s: ten rows, each scored
def test_samplers_sweep_scores_each_sampler_from_the_same_noise(ckpts, tiny_mnist, tmp_path, capsys):
    rows = run(capsys, tiny_mnist, tmp_path, "samplers", "--ckpt", ckpts / "ddpm" / "ckpt.pt", "--ddim-steps",
               "4,20", "--reference-samples", "8")
    assert [(r["sampler"], r["eta"], r["evaluations"]) for r in rows] == [
        (sampler, eta, n) for sampler, eta in bench.SAMPLERS for n in (4, 20)]
    assert all(r["fid"] > 0 and r["img_s"] > 0 and r["rmse"] >= 0 for r in rows)
    ode = {r["sampler"]: r["rmse"] for r in rows if r["evaluations"] == 20 and r["eta"] != 1.0}
    assert ode["ddim"] == 0  # DDIM eta 0 with all T = 20 steps is the reference itself
    assert json.loads((tmp_path / "samplers.json").read_text())["rows"] == rows
    with pytest.raises(SystemExit):  # PNDM needs 4 steps
        run(capsys, tiny_mnist, tmp_path, "samplers", "--ckpt", ckpts / "ddpm" / "ckpt.pt", "--ddim-steps", "3")


def test_nll_gives_bits_per_dim_with_every_term(ckpts, tiny_mnist, tmp_path, capsys):
    rows = bench.main(["nll", "--ckpt", str(ckpts / "ddpm" / "ckpt.pt"), "--samples", "6", "--sample-batch-size",
                       "4", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), "--device", "cpu"])
    assert [r["sigma"] for r in rows] == ["posterior", "beta"] and all(r["images"] == 6 for r in rows)
    for r in rows:  # T = 20: L_0 .. L_19 and L_T, summing to the bound
        assert len(r["terms"]) == 21 and min(r["terms"]) >= 0 and r["standard_error"] > 0
        assert sum(r["terms"]) == pytest.approx(r["bits_per_dim"])
    assert "terms" not in (tmp_path / "nll.txt").read_text()  # the list stays in the JSON
    bad = [(["--samples", "1"], "--samples 1: a standard error needs 2 images or more"),
           (["--samples", "300"], "--samples 300: the test split of mnist has 256 images"),
           (["--ckpt", str(ckpts / "latent" / "ckpt.pt")], "is not a checkpoint of ddpm.py or ddim.py")]
    for argv, message in bad:
        with pytest.raises(SystemExit):
            bench.main(["nll", "--ckpt", str(ckpts / "ddpm" / "ckpt.pt"), "--data-dir", str(tiny_mnist),
                        "--out-dir", str(tmp_path), "--device", "cpu", *argv])
        assert message in capsys.readouterr().err


def test_guidance_sweep_scores_every_w(ckpts, tiny_mnist, tmp_path, capsys):
    rows = run(capsys, tiny_mnist, tmp_path, "guidance-sweep", "--ckpt", ckpts / "conditional" / "ckpt.pt",
               "--sampling-steps", "2")
    assert [r["w"] for r in rows] == list(bench.GUIDANCE) and [r["s"] for r in rows] == [1, 1.5, 2, 3, 5]
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] > 0 and r["img_s"] > 0 for r in rows)
    assert {r["guidance"] for r in rows} == {"free"}
    # With a classifier, classifier guidance follows on the same noise, labels and sampler.
    rows = run(capsys, tiny_mnist, tmp_path, "guidance-sweep", "--ckpt", ckpts / "conditional" / "ckpt.pt",
               "--sampling-steps", "2", "--classifier", ckpts / "conditional" / "classifier.pt", "--scales", "0,3")
    assert [(r["guidance"], r["w"], r["s"]) for r in rows[-2:]] == [("classifier", None, 0), ("classifier", None, 3)]
    assert rows[-1]["fid"] > 0 and rows[-1]["fid"] != rows[-2]["fid"] and 0 <= rows[-1]["accuracy"] <= 1


def test_speckles_are_bright_pixels_with_no_bright_neighbour():
    images = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    images[0, 0, 0, 0] = 255  # alone in a corner: a speckle
    images[1, 0, 2, 2:4] = 200  # a stroke two pixels long: none
    images[2, 0, 1, 1], images[2, 0, 2, 2] = 255, 255  # diagonal neighbours: none
    images[3, 0, 4, 4], images[3, 0, 1, 1] = 63, 64  # too dim, and just bright enough
    mask = bench.speckles(images)
    assert mask.flatten(1).sum(1).tolist() == [1, 0, 0, 1]
    assert mask[0, 0, 0, 0] and mask[3, 0, 1, 1]


@pytest.mark.slow  # 9 s: seven rows, each scored
def test_speckle_sweep_changes_one_cause_at_a_time_from_the_same_noise(ckpts, tiny_mnist, tmp_path, capsys,
                                                                       monkeypatch):
    calls, sample_loop = [], conditional.ddim_sample_loop
    def spy(*args, clip_x0=True):  # what each run asks of the sampler
        calls.append((args[4], clip_x0))
        return sample_loop(*args, clip_x0=clip_x0)
    monkeypatch.setattr(conditional, "ddim_sample_loop", spy)
    rows = run(capsys, tiny_mnist, tmp_path, "speckles", "--ckpt", ckpts / "conditional" / "ckpt.pt")
    assert calls == [(0, True), (0, False), (0, True), (0, True), (0.2, True), (0.5, True), (1, True)]
    assert [r["run"] for r in rows] == ["test images", *[name for name, _ in bench.SPECKLE_RUNS]]
    assert [(r["w"], r["steps"], r["eta"], r["clip_x0"]) for r in rows[1:]] == [  # S = 50 and 200 are T = 20
        (1, 20, 0, True), (1, 20, 0, False), (0, 20, 0, True), (1, 20, 0, True), (1, 20, 0.2, True),
        (1, 20, 0.5, True), (1, 20, 1, True)]
    assert rows[1]["fid"] == rows[4]["fid"] and rows[1]["speckled"] == rows[4]["speckled"]  # the same x_T
    assert rows[1]["fid"] != rows[3]["fid"]  # w = 0
    assert rows[1]["fid"] != rows[7]["fid"]  # eta 1
    assert all(0 <= r["speckled"] <= 1 and r["per_image"] >= 0 for r in rows)
    assert all(r["fid"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows[1:])
    picture = np.asarray(Image.open(tmp_path / "speckles.png"))
    assert picture.shape == (2 + 7 * (3 * 28 + 2), 2 + 10 * (3 * 28 + 2), 3)  # a row per run, 0 to 9
    with pytest.raises(SystemExit):  # a ddpm.py checkpoint has no classes
        run(capsys, tiny_mnist, tmp_path, "speckles", "--ckpt", ckpts / "ddpm" / "ckpt.pt")
    for sweep in ("speckles", "guidance-sweep"):  # the classifier's file is not the model's
        with pytest.raises(SystemExit):
            bench.main([sweep, "--ckpt", str(ckpts / "conditional" / "classifier.pt"), "--out-dir",
                        str(tmp_path), "--device", "cpu"])
        assert "is a classifier's file: pass it as --classifier" in capsys.readouterr().err


def test_reconstructions_and_the_latent_against_pixel_timing(ckpts, tiny_mnist, tmp_path, capsys):
    (r,) = run(capsys, tiny_mnist, tmp_path, "reconstructions", "--ckpt", ckpts / "latent" / "ckpt.pt")
    assert r["images"] == 130 and r["fid"] > 0 and r["fid_over_floor"] == pytest.approx(r["fid"] / r["floor_fid"])
    rows = run(capsys, tiny_mnist, tmp_path, "latent-vs-pixel", "--ckpt", ckpts / "latent" / "ckpt.pt",
               "--pixel-ckpt", ckpts / "ddpm" / "ckpt.pt")
    assert [(r["script"], r["part"]) for r in rows] == [
        ("latent", "train autoencoder"), ("latent", "train U-Net"), ("latent", "sample, 200 passes"),
        ("ddpm", "train U-Net"), ("ddpm", "sample, 20 passes")]
    assert all(r["img_s"] > 0 and r["minutes"] > 0 for r in rows)


def test_a_folder_checkpoint_or_too_few_samples_end_in_one_line(ckpts, tiny_mnist, tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    conditional.main(["--dataset", str(tmp_path / "imgs"), "--image-size", "28", "--out-dir", str(tmp_path / "o"),
                      *TINY, "--sampling-steps", "2"])
    capsys.readouterr()
    for argv, message in ((["guidance-sweep", "--ckpt", tmp_path / "o" / "ckpt.pt"], "evaluate.py scores mnist"),
                          (["ddim-sweep", "--ckpt", ckpts / "ddpm" / "ckpt.pt", "--samples", "100"],
                           "--samples 100: evaluate.py needs at least 129")):
        with pytest.raises(SystemExit) as e:
            bench.main([*map(str, argv), "--device", "cpu", "--data-dir", str(tiny_mnist)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_restoration_scores_each_task_against_its_baseline(ckpts, tiny_mnist, tmp_path, capsys):
    rows = run(capsys, tiny_mnist, tmp_path, "restoration", "--ckpt", ckpts / "ddpm" / "ckpt.pt", "--tasks",
               "denoise,inpaint-left", "--restore-steps", "3")
    assert [(r["task"], r["images"]) for r in rows] == [
        ("none", "clean"), ("denoise", "restored"), ("denoise", "baseline"), ("inpaint-left", "restored"),
        ("inpaint-left", "baseline")]
    assert all(r["fid"] > 0 for r in rows) and all(0 < r["psnr"] < 100 for r in rows[1:])
    assert rows[1]["seconds"] > 0 and rows[2]["seconds"] == 0
    assert rows[2]["psnr"] != rows[4]["psnr"]  # each task its own baseline
