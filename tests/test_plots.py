"""Tests of `python bench.py plots`: every plot drawn from small result files that the test writes,
a missing file skipped in one line, a broken one refused in one line, and the committed result
files in samples/ holding what the plots read (the DDIM rows exactly those of the sweeps' text)."""
import json

import pytest
from PIL import Image

import bench
import conditional
import restore
from conftest import ROOT

HARDWARE = "a test machine"


def write_results(folder):
    """A few rows of each result file the plots read, shaped as bench.py writes them."""
    ddim_rows = []
    for model in ("short", "long"):
        for eta in (0.0, 1.0):
            for S, fid in ((10, 6.0), (50, 4.0)):
                ddim_rows.append({"model": model, "S": S, "eta": eta, "fid": fid - eta})
    ddim = {"sweep": "ddim-sweep", "samples": 1000, "hardware": HARDWARE, "rows": ddim_rows,
            "reference": [{"model": "short", "sampler": "Alg. 2", "fid": 3.0}]}
    guidance = {"sweep": "guidance-sweep", "samples": 1000, "hardware": HARDWARE, "rows": [
        {"guidance": "free", "w": 0.0, "s": 1.0, "fid": 2.7, "accuracy": 0.90},
        {"guidance": "free", "w": 1.0, "s": 2.0, "fid": 1.6, "accuracy": 0.99},
        {"guidance": "classifier", "w": None, "s": 1.0, "fid": 11.0, "accuracy": 0.44},
        {"guidance": "classifier", "w": None, "s": 16.0, "fid": 6.0, "accuracy": 0.89}]}
    restoration = {"sweep": "restoration", "samples": 500, "hardware": HARDWARE, "rows": [
        {"task": "none", "images": "clean", "psnr": None, "fid": 1.3},
        {"task": "denoise", "images": "restored", "psnr": 23.1, "fid": 1.4},
        {"task": "denoise", "images": "baseline", "psnr": 14.9, "fid": 25.2},
        {"task": "superres", "images": "restored", "psnr": 14.7, "fid": 4.6, "resample": 3},
        {"task": "superres", "images": "baseline", "psnr": 14.3, "fid": 66.1, "resample": 3}]}
    samplers = {"sweep": "samplers", "samples": 1000, "hardware": HARDWARE, "rows": [
        {"sampler": sampler, "eta": eta, "evaluations": n, "fid": 10 / n ** 0.5 + (eta or 0)}
        for sampler, eta in bench.SAMPLERS for n in (5, 10, 20)],
        "reference": [{"sampler": "Alg. 2, 1,000 steps", "fid": 3.3}, {"sampler": "the ODE", "fid": 5.9}]}
    nll = {"sweep": "nll", "samples": 100, "hardware": HARDWARE, "rows": [
        {"sigma": sigma, "bits_per_dim": 1.5 + k, "terms": [1.0 + k, 0.1, 0.01, 0.001, 1e-5]}
        for k, sigma in enumerate(("posterior", "beta"))]}
    minutes = {"samples": 1000, "hardware": HARDWARE, "floor_fid": 0.53, "rows": [
        {"sampler": "DDIM, S = 50, eta = 1", "minutes": m, "images_seen": m * 11_000, "fid": 10 / m ** 0.6}
        for m in (12, 24, 48)] + [{"sampler": "Alg. 2", "minutes": 48, "images_seen": 528_000, "fid": 1.5}]}
    flow = {"sweep": "flow", "samples": 1000, "hardware": HARDWARE, "rows": [
        {"t_sampling": how, "seed": seed, "sampler": sampler, "evaluations": n, "fid": 8 / n ** 0.5 + seed}
        for how in ("logit-normal", "uniform") for seed in (0, 1) for sampler in ("euler", "heun")
        for n in (5, 9, 19)]}
    for name, result in (("ddim_sweep_cpu.json", ddim), ("guidance_sweep_cpu.json", guidance),
                         ("restoration_cpu.json", restoration), ("samplers_cpu.json", samplers),
                         ("nll_cpu.json", nll), ("flow_cpu.json", flow), ("ddpm_minutes_cpu.json", minutes)):
        (folder / name).write_text(json.dumps(result))
    log = "step,loss,lr,img_s\n100,0.2,0.002,220.5\n200,0.08,0.0015,225.0\n300,0.05,0.0005,224.1\n"
    (folder / "ddpm_mnist_cpu_log.csv").write_text(log)
    (folder / "ddpm_mnist_cpu_log.json").write_text(json.dumps({"hardware": HARDWARE}))


def plots(folder):
    return bench.main(["plots", "--results-dir", str(folder), "--out-dir", str(folder / "out")])


def test_every_plot_is_drawn_from_small_result_files(tmp_path, capsys):
    write_results(tmp_path)
    plots(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"plots: {tmp_path / 'out' / name}" for name in bench.PLOTS]
    for name in bench.PLOTS:
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 400, name
            darkest, lightest = image.convert("L").getextrema()
            assert lightest - darkest > 200, name  # drawn on, not blank
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(bench.PLOTS)  # no .tmp


@pytest.mark.parametrize("missing", ["ddpm_mnist_cpu_log.csv", "guidance_sweep_cpu.json"])
def test_a_missing_result_file_skips_its_plot_in_one_line(missing, tmp_path, capsys):
    write_results(tmp_path)
    (tmp_path / missing).unlink()
    plots(tmp_path)
    out = capsys.readouterr().out.splitlines()
    skipped = [name for name, (_, source) in bench.PLOTS.items() if source == missing]
    assert [line for line in out if "skipped" in line] == [
        f"plots: skipped {skipped[0]}: no {tmp_path / missing}"]
    assert len(out) == len(bench.PLOTS)  # the others drawn, one line each
    drawn = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert drawn == sorted(name for name in bench.PLOTS if name != skipped[0])


def test_a_result_file_without_a_field_the_plot_reads_ends_in_one_line(tmp_path, capsys):
    write_results(tmp_path)
    result = json.loads((tmp_path / "restoration_cpu.json").read_text())
    del result["rows"][1]["fid"]
    (tmp_path / "restoration_cpu.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit) as e:
        plots(tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "restoration_cpu.json" in err, err
    assert "plot_restoration.png" in err and "'fid'" in err


def committed(name):
    result = json.loads((ROOT / "samples" / name).read_text())
    for key in ("source", "hardware", "command", "date", "samples", "rows"):
        assert result[key], (name, key)
    return result


def test_the_committed_ddim_rows_are_those_of_the_sweeps_text_output():
    result = committed("ddim_sweep_cpu.json")
    assert result["samples"] == 1000 and result["reference"][0]["fid"] == 3.26  # Alg. 2's
    models = {}
    for r in result["rows"]:
        models.setdefault(r["model"], []).append(r)
    assert len(models) == 3
    for rows, text in zip(models.values(), ("ddim_mnist_cpu_sweep_new.txt", "ddim_mnist_cpu_sweep_long.txt",
                                            "ddim_mnist_cpu_sweep_120min.txt")):
        lines = (ROOT / "samples" / text).read_text().splitlines()
        assert lines[-1].startswith("1000 samples per row, cpu")
        for r, line in zip(rows, lines[:-1], strict=True):
            fields = line.split()
            expected = {k: float(v) for k, v in zip(fields[::2], fields[1::2])}
            assert {k: r[k] for k in expected} == expected, line
    assert [ref["model"] for ref in result["reference"]] == [*models][::2]  # Alg. 2: 4,500 and 45,000 steps


def test_the_committed_guidance_and_restoration_files_hold_what_the_plots_read():
    result = committed("guidance_sweep_cpu.json")
    free = [r for r in result["rows"] if r["guidance"] == "free"]
    classifier = [r for r in result["rows"] if r["guidance"] == "classifier"]
    assert [r["w"] for r in free] == [0, 0.5, 1, 2, 4]
    assert all(r["s"] == 1 + r["w"] for r in free)  # the axis both guidances share
    assert [r["s"] for r in classifier] == [1, 2, 4, 8, 16, 32]
    assert all(r["fid"] > 0 and 0 <= r["accuracy"] <= 1 for r in result["rows"])
    result = committed("restoration_cpu.json")
    assert [r["images"] for r in result["rows"]].count("clean") == 1
    for task in restore.TASKS:
        rows = [r for r in result["rows"] if r["task"] == task and r.get("resample", 1) == 1]
        assert sorted(r["images"] for r in rows) == ["baseline", "restored"], task
        assert all(r["psnr"] > 0 and r["fid"] > 0 for r in rows), task


@pytest.mark.parametrize("name", ["samplers_cpu", "guidance_sweep_cpu", "flow_cpu", "flow_seeds_cpu", "flow_120min_cpu"])
def test_the_committed_rows_are_those_of_the_sweeps_text_output(name):
    result = committed(name + ".json")
    lines = (ROOT / "samples" / (name + ".txt")).read_text().splitlines()
    assert lines[-1].startswith("1000 samples per row, cpu") and result["samples"] == 1000
    for r, line in zip(result["rows"], lines[:-1], strict=True):
        fields = line.split()
        for key, value in zip(fields[::2], fields[1::2]):
            assert str(r[key]) == value or r[key] == pytest.approx(float(value), rel=1e-3), (key, line)


def test_the_committed_sampler_references_are_the_12_minute_models():
    result = committed("samplers_cpu.json")
    assert [ref["fid"] for ref in result["reference"]] == [3.26, 5.93]  # Alg. 2; DDIM eta 0 at S = 100


def test_the_committed_bound_holds_every_term():
    result = committed("nll_cpu.json")
    assert [r["sigma"] for r in result["rows"]] == ["posterior", "beta"]
    for r in result["rows"]:
        assert r["images"] == 1000 and len(r["terms"]) == 1001  # L_0 .. L_999 and L_T
        assert sum(r["terms"]) == pytest.approx(r["bits_per_dim"])


def test_conditional_samples_by_default_with_the_eta_that_the_committed_speckle_sweep_chose():
    result = committed("conditional_speckles_cpu.json")
    rows = {r["run"]: r for r in result["rows"]}
    assert rows["test images"]["speckled"] == 0
    default = conditional.FLAGS["eta"][0]
    (chosen,) = [r for r in result["rows"][1:] if (r["eta"], r["w"], r["steps"], r["clip_x0"]) == (
        default, 1, conditional.FLAGS["sampling_steps"][0], True)]
    assert chosen["speckled"] < rows["eta 0"]["speckled"] / 5 and chosen["fid"] <= rows["eta 0"]["fid"]


def test_the_minutes_rows_are_those_of_the_committed_sweeps_they_name():
    """plot_minutes.png's points: where a row's source is a committed sweep, its FID is that sweep's
    row; and every row's images and minutes follow from its steps (batch 32, at the stated rate)."""
    result = committed("ddpm_minutes_cpu.json")
    ddim = committed("ddim_sweep_cpu.json")["rows"]
    flows = {name: committed(name)["rows"] for name in ("flow_cpu.json", "flow_120min_cpu.json")}
    checked = 0
    for r in result["rows"]:
        assert r["images_seen"] == 32 * r["steps"] and r["minutes"] == round(r["images_seen"] / 224.3 / 60, 2)
        if r["source"].startswith("samples/ddim_mnist_cpu_sweep"):
            (same,) = [d for d in ddim if d["model"].startswith(f"{r['steps']:,} ") and d["S"] == 50 and d["eta"] == 1]
        elif r["source"].startswith("samples/flow"):
            rows = flows[r["source"].split(":")[0].removeprefix("samples/")]
            (same,) = [f for f in rows if f["sampler"] == "heun" and f["evaluations"] == 19
                       and f["t_sampling"] == "logit-normal"]
        else:
            continue
        assert r["fid"] == pytest.approx(same["fid"], rel=1e-3), r
        checked += 1
    assert checked == 4  # DDIM at 4,500 and 13,500 steps, flow.py at 4,500 and 45,000
