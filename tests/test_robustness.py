"""Nothing lost, nothing silent: the failures found by probing the scripts with bad input, faults and
concurrency, each with a test so that none comes back. The usual tests of each script keep what
already held (atomic checkpoints, exact resume after Ctrl-C, one line for each bad flag)."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import conditional
import ddim
import ddpm
import evaluate
import flow
import latent
import restore
from conftest import ROOT

TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "16", "--num-samples", "16", "--log-every", "5",
        "--sample-every", "0"]
LATENT = ["--ae-channels", "8", "--ae-batch-size", "8"]
FLOW = [arg for arg in TINY if arg not in ("--timesteps", "20")]  # flow.py's path has no T
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_cli(script, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=kw.pop("cwd", None), env=ENV, timeout=300, **kw)


def one_line_error(r, message):
    """exit status 2, one line on stderr naming the problem, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and message in lines[0], r.stderr[-2000:]


def expect_usage_error(module, capsys, argv, message):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err, err


def image_folder(root, n, size=(28, 28), sub=""):
    (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / sub / f"{i}.png")
    return root


# ---- 1. latent.py on an image folder, small or not, to the end and on resume ----

@pytest.mark.slow  # a real process or kernel
def test_latent_trains_and_resumes_on_a_small_image_folder(tmp_path):
    folder = image_folder(tmp_path / "imgs", 10)
    common = ["--dataset", folder, "--image-size", 28, "--out-dir", tmp_path / "o", *TINY, *LATENT]
    r = run_cli("latent.py", *common, "--ae-steps", 3, "--steps", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "autoencoder: reconstruction MSE" in r.stdout and (tmp_path / "o" / "reconstructions.png").is_file()
    r = run_cli("latent.py", *common, "--ae-steps", 3, "--steps", 5, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == 5


# ---- 3. outputs that cannot be written are found before any work ----

@pytest.mark.slow  # a real process or kernel
@pytest.mark.parametrize("flag", ["--ckpt", "--npz"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_mnist, flag):
    (tmp_path / "afile").write_text("")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    blocked = [tmp_path / "afile" / "out.pt"]  # under a file
    blocked.append(readonly / "out.pt" if os.geteuid() else "/proc/1/out.pt")  # read-only storage
    for path in blocked:
        t0 = time.time()
        r = run_cli("ddpm.py", "--data-dir", tiny_mnist, "--out-dir", tmp_path / "o", *TINY, "--steps", 100000,
                    flag, path)
        one_line_error(r, "cannot write")
        assert time.time() - t0 < 60 and not (tmp_path / "o" / "ckpt.pt").exists()  # no training happened


# ---- 4. a second run into a busy folder is refused; a killed run leaves no stale lock ----

@pytest.mark.slow  # a real process or kernel
def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_one_frees_it(tmp_path, tiny_mnist):
    common = ["--data-dir", tiny_mnist, "--out-dir", tmp_path, *TINY, "--ckpt-every", 5]
    first = subprocess.Popen([sys.executable, str(ROOT / "ddpm.py"), *map(str, common), "--steps", "100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not (tmp_path / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    try:
        one_line_error(run_cli("ddpm.py", *common, "--steps", 20, "--resume"), "is in use by another run")
        # Another checkpoint in the same folder: no "exists" refusal, but the outputs would collide.
        one_line_error(run_cli("conditional.py", *common, "--steps", 20, "--ckpt", tmp_path / "other.pt"),
                       "is in use by another run")
    finally:
        first.kill()  # kill -9: no handler runs, and the kernel frees the lock
        first.wait()
    r = run_cli("ddpm.py", *common, "--steps", torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] + 2,
                "--resume")
    assert r.returncode == 0, r.stderr[-2000:]


def test_temporary_files_are_per_process(tmp_path, monkeypatch):
    """Two processes never write the same temporary file: its name carries the process id."""
    renamed = []
    monkeypatch.setattr(ddpm.os, "replace", lambda src, dst: renamed.append(src) or os.rename(src, dst))
    ddpm.save_checkpoint(tmp_path / "c.pt", {"a": 1})
    assert renamed == [tmp_path / f"c.pt.{os.getpid()}.tmp"] and os.listdir(tmp_path) == ["c.pt"]


# ---- 5. non-finite flags are refused; the non-finite loss message is true ----

@pytest.mark.parametrize("script,flag,value,message", [
    ("ddpm.py", "--lr", "nan", "--lr: must be positive, got nan"),
    ("ddpm.py", "--grad-clip", "nan", "--grad-clip: must be non-negative, got nan"),
    ("ddpm.py", "--ema-decay", "inf", "--ema-decay: must be in [0, 1), got inf"),
    ("ddim.py", "--eta", "nan", "--eta: must be in [0, 1], got nan"),
    ("conditional.py", "--guidance", "inf", "--guidance: must be non-negative"),
    ("latent.py", "--kl-weight", "nan", "--kl-weight: must be non-negative, got nan"),
    ("flow.py", "--lr", "inf", "--lr: must be positive, got inf"),
])
def test_non_finite_flags_are_refused(capsys, tmp_path, script, flag, value, message):
    module = {"ddpm.py": ddpm, "ddim.py": ddim, "conditional.py": conditional, "latent.py": latent,
              "flow.py": flow}[script]
    expect_usage_error(module, capsys, [flag, value, "--out-dir", tmp_path], message)


def test_a_non_finite_loss_before_any_checkpoint_says_so(tiny_mnist, tmp_path):
    with pytest.raises(SystemExit) as e:
        ddpm.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *TINY, "--steps", "50", "--lr", "1e30",
                   "--warmup", "0", "--log-every", "1"])
    assert "non-finite at step" in str(e.value.code) and "No checkpoint was saved" in str(e.value.code)
    assert not (tmp_path / "ckpt.pt").exists()


# ---- 6. images are read right, or refused in one line ----

def test_16_bit_grayscale_keeps_its_levels(tmp_path):
    levels = np.arange(12, 244, dtype=np.uint16).reshape(8, 29)
    (tmp_path / "x").mkdir()
    Image.fromarray(levels * 257).save(tmp_path / "x" / "a.png")
    assert Image.open(tmp_path / "x" / "a.png").mode.startswith("I")  # read as 16 bits by Pillow
    loaded = np.asarray(ddpm.read_image(tmp_path / "x" / "a.png"))[..., 0]
    assert np.abs(loaded.astype(int) - levels).max() <= 1  # not saturated to 208-255


def test_float_images_bombs_and_folders_named_like_images(tmp_path, monkeypatch, capsys):
    image_folder(tmp_path / "f", 2)
    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(tmp_path / "f" / "float.tiff")
    with pytest.raises(ValueError, match="a float image has no agreed range"):
        ddpm.load_images(str(tmp_path / "f"), "unused", 28)
    (tmp_path / "f" / "float.tiff").unlink()
    (tmp_path / "f" / "x.jpg").mkdir()  # a folder with an image's name is no image
    images, _ = ddpm.load_images(str(tmp_path / "f"), "unused", 28)
    assert images.shape == (2, 3, 28, 28)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a "bomb": over twice the limit of pixels
    with pytest.raises(ValueError, match="cannot read image .*decompression bomb"):
        ddpm.load_images(str(tmp_path / "f"), "unused", 28)


# ---- 7. memory: estimated before allocating, refused in one line ----

def test_what_would_not_fit_in_memory_is_refused_before_allocating(capsys, tiny_mnist, tmp_path):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = 4 * math.ceil(math.sqrt(total / 512) / 4)  # 512 tiny-MNIST images at this side: over all memory
    expect_usage_error(ddpm, capsys, ["--data-dir", tiny_mnist, "--out-dir", tmp_path, *TINY, "--image-size", size],
                       f"mnist at --image-size {size} needs")
    expect_usage_error(ddpm, capsys, ["--data-dir", tiny_mnist, "--out-dir", tmp_path, *TINY, "--sample-batch-size",
                                      300000], "a sampling batch of 300000 (--sample-batch-size) needs")


# ---- 8. signals: SIGTERM as Ctrl-C; the first stops at the next step, a second at once ----

@pytest.mark.slow  # a real process or kernel
@pytest.mark.parametrize("script", ["ddpm.py", "flow.py"])
def test_sigterm_saves_a_checkpoint_that_resumes(tiny_mnist, tmp_path, script):
    tiny = FLOW if script == "flow.py" else TINY
    common = ["--data-dir", tiny_mnist, "--out-dir", tmp_path, *tiny, "--ckpt-every", 1000, "--log-every", 1000]
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, common), "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while "img/s" not in proc.stderr.read(64) and time.time() < deadline:  # training has begun
        pass
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at step" in stdout
    k = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert 0 < k < 1000  # saved at once, not at the next --ckpt-every or --log-every
    r = run_cli(script, *common, "--steps", k + 3, "--resume")
    assert r.returncode == 0 and f"trained at step {k + 3}" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("signals", [1, 2])
def test_the_first_signal_stops_at_the_next_step_and_a_second_at_once(tmp_path, signals):
    model = ddpm.UNet(1, base=8, mult=(1,), num_res_blocks=1)
    opt, seen = torch.optim.AdamW(model.parameters()), []
    def batch_loss(net, gen):  # at step 3, a Ctrl-C (or two) arrives while the step computes
        seen.append(len(seen) + 1)
        for _ in range(signals if len(seen) == 3 else 0):
            os.kill(os.getpid(), signal.SIGINT)
        return sum(p.sum() for p in net.parameters()) * 0
    args = ddpm.argparse.Namespace(steps=1000, lr=1e-3, warmup=0, lr_decay=False, compile=False, seed=0,
                                   batch_size=1, log_every=1000, ckpt_every=1000, sample_every=0, grad_clip=1.0,
                                   ema_decay=0.9)
    before = signal.getsignal(signal.SIGINT)
    if signals == 1:
        assert ddpm.train(model, ddpm.copy.deepcopy(model), opt, batch_loss, args, 0, tmp_path / "c.pt", {})
        assert seen == [1, 2, 3] and torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3
    else:
        with pytest.raises(SystemExit, match="stopped at once"):
            ddpm.train(model, ddpm.copy.deepcopy(model), opt, batch_loss, args, 0, tmp_path / "c.pt", {})
        assert seen == [1, 2, 3] and not (tmp_path / "c.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back either way


# ---- 9. smaller: hand-edited checkpoints, resume checks, flags that were ignored ----

@pytest.mark.parametrize("edit", ["config a string", "T = 0"])
def test_hand_edited_checkpoints_end_in_one_line(capsys, tiny_mnist, tmp_path, edit):
    ddpm.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *TINY, "--steps", "2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    if edit == "config a string":
        ckpt["config"] = "oops"
    else:
        ckpt["config"]["timesteps"] = 0
    torch.save(ckpt, tmp_path / "edited.pt")
    expect_usage_error(ddpm, capsys, ["--sample-only", "--ckpt", tmp_path / "edited.pt", "--out-dir", tmp_path],
                       "edited.pt: its weights do not fit its own config; it is damaged")


@pytest.mark.parametrize("edit", ["config a string", "NaN weights", "a ddpm.py checkpoint"])
def test_flow_refuses_damaged_and_foreign_checkpoints_in_one_line(capsys, ckpts, tmp_path, edit):
    ckpt = torch.load(ckpts / "flow" / "ckpt.pt", weights_only=True)
    message = "edited.pt: its weights do not fit its own config; it is damaged"
    if edit == "config a string":
        ckpt["config"] = "oops"
    elif edit == "NaN weights":
        ckpt["ema"] = {name: torch.full_like(w, math.nan) for name, w in ckpt["ema"].items()}
        message = "is not finite floats: damaged"
    else:
        ckpt["script"], message = "ddpm", "edited.pt is not a checkpoint of flow.py (it says 'ddpm')"
    torch.save(ckpt, tmp_path / "edited.pt")
    expect_usage_error(flow, capsys, ["--sample-only", "--ckpt", tmp_path / "edited.pt", "--out-dir", tmp_path / "o"],
                       message)
    assert not (tmp_path / "o" / "samples.png").exists()


def test_resume_takes_equal_flags_and_refuses_other_images(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 6)
    common = ["--out-dir", tmp_path / "o", *TINY]
    ddpm.main(list(map(str, ["--dataset", folder, "--image-size", 28, *common, "--steps", 2])))
    # The size the run resolved is saved: passing it again, or the folder with a trailing /, is the same.
    assert ddpm.main(list(map(str, ["--dataset", f"{folder}/", "--image-size", 28, *common, "--steps", 3,
                                    "--resume"]))) is not None
    image_folder(folder, 1, sub="new")  # an image more: other data under the same name
    expect_usage_error(ddpm, capsys, ["--dataset", folder, *common, "--steps", 4, "--resume"],
                       "was trained on other images: 6 images")


def test_flags_that_used_to_be_ignored_or_overflow(capsys, tiny_mnist, tmp_path):
    ddpm.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *TINY, "--steps", "2"])
    expect_usage_error(ddpm, capsys, ["--sample-only", "--ckpt", tmp_path / "ckpt.pt", "--timesteps", 5],
                       "was trained with --timesteps 20, not 5")
    expect_usage_error(ddpm, capsys, ["--seed", 2 ** 32], "--seed: must be in 0..2^31-1")
    expect_usage_error(ddpm, capsys, ["--timesteps", 1], "--timesteps: must be at least 2")
    capsys.readouterr()
    ddpm.main(["--sample-only", "--ckpt", str(tmp_path / "ckpt.pt"), "--out-dir", str(tmp_path / "s"), "--npz",
               str(tmp_path / "x"), "--num-samples", "4"])
    assert (tmp_path / "x.npz").is_file() and f"{tmp_path / 'x'}.npz" in capsys.readouterr().out


def test_an_empty_class_folder_is_refused(capsys, tmp_path):
    image_folder(tmp_path / "imgs", 2, sub="a")
    (tmp_path / "imgs" / "b").mkdir()
    expect_usage_error(conditional, capsys, ["--dataset", tmp_path / "imgs", "--out-dir", tmp_path / "o", *TINY],
                       "the class folder b holds no images")


# ---- 10. bench.py and restore.py (issue 34): each mistake refused in one line, before any work ----

@pytest.fixture(scope="module")
def ckpts(tiny_mnist, tmp_path_factory):
    """A tiny ddpm.py, conditional.py and flow.py checkpoint (and evaluate.py's cache, were anything scored)."""
    out = tmp_path_factory.mktemp("ckpts")
    common = ["--data-dir", str(tiny_mnist), *TINY, "--steps", "2"]
    ddpm.main([*common, "--out-dir", str(out / "ddpm")])
    conditional.main([*common, "--out-dir", str(out / "conditional"), "--sampling-steps", "2"])
    flow.main(["--data-dir", str(tiny_mnist), *FLOW, "--steps", "2", "--out-dir", str(out / "flow")])
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Sampling, restoring or scoring fails the test: the error must come before any of them."""
    def work(*args, **kwargs):
        raise AssertionError("work was done before the error")
    for module, name in ((ddim, "generate"), (conditional, "generate"), (restore, "run_task"),
                         (evaluate, "evaluate_images")):
        monkeypatch.setattr(module, name, work)


def bench_argv(ckpts, tiny_mnist, out, sweep, *flags):
    """bench.py's argv for a sweep on the tiny checkpoint it takes."""
    ckpt = ckpts / "ddpm" / "ckpt.pt"
    if sweep == "guidance-sweep":
        ckpt, flags = ckpts / "conditional" / "ckpt.pt", ["--sampling-steps", 2, *flags]  # S <= T = 20
    return [sweep, "--ckpt", ckpt, *flags, "--samples", 130, "--data-dir", tiny_mnist, "--cache-dir",
            ckpts / "cache", "--out-dir", out, "--device", "cpu"]


def restore_argv(ckpt, tiny_mnist, out, *flags):
    return ["--ckpt", ckpt, "--data-dir", tiny_mnist, "--out-dir", out, "--device", "cpu", "--tasks", "denoise",
            "--num-images", 2, *flags]


@pytest.mark.parametrize("module", [conditional, restore, bench])
def test_a_finite_flag_that_overflows_float32_is_refused_not_sampled_to_zeros(capsys, ckpts, tiny_mnist,
                                                                              tmp_path, no_work, module):
    if module is conditional:
        argv = ["--sample-only", "--ckpt", ckpts / "conditional" / "ckpt.pt", "--guidance", "1e39", "--npz",
                tmp_path / "a.npz", "--num-samples", 4, "--sampling-steps", 2, "--device", "cpu", "--out-dir",
                tmp_path]
        flag = "--guidance"
    elif module is restore:
        argv = restore_argv(ckpts / "ddpm" / "ckpt.pt", tiny_mnist, tmp_path, "--noise-std", "1e39")
        flag = "--noise-std"
    else:
        argv = bench_argv(ckpts, tiny_mnist, tmp_path, "guidance-sweep", "--ws", "1e39")
        flag = "--ws"
    expect_usage_error(module, capsys, argv, f"{flag}: must fit float32 (at most 3.4e38), got 1e39")
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "denoise.png").exists()


def test_restore_refuses_a_folder_where_a_picture_goes_before_restoring(capsys, ckpts, tiny_mnist, tmp_path,
                                                                         no_work):
    (tmp_path / "denoise.png").mkdir()
    expect_usage_error(restore, capsys, restore_argv(ckpts / "ddpm" / "ckpt.pt", tiny_mnist, tmp_path),
                       "denoise.png: it is a folder")


@pytest.mark.parametrize("blocked", ["out-dir under a file", "result a folder"])
def test_bench_refuses_outputs_it_cannot_write_before_the_sweep(capsys, ckpts, tiny_mnist, tmp_path, no_work,
                                                                blocked):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    if blocked == "result a folder":
        out = tmp_path / "o"
        (out / "ddim-sweep.json").mkdir(parents=True)
    expect_usage_error(bench, capsys, bench_argv(ckpts, tiny_mnist, out, "ddim-sweep", "--ddim-steps", 1),
                       "cannot write")
    assert (tmp_path / "afile").read_text() == "" and not list(tmp_path.rglob("ddim-sweep.txt"))


@pytest.mark.parametrize("sweep,flags,message", [
    ("ddim-sweep", ["--ddim-steps", -5], "--ddim-steps: must be positive, got -5"),
    ("guidance-sweep", ["--sampling-steps", 5000], "--sampling-steps 5000 is more than the model's T = 20"),
    ("restoration", ["--tasks", "foo"], "foo is not one of denoise,"),
    ("restoration", ["--tasks", "denoise,superres", "--scale", 3], "--scale 3 does not divide the model's 28x28"),
])
def test_bench_flags_that_ended_in_tracebacks_are_refused_before_work(capsys, ckpts, tiny_mnist, tmp_path, no_work,
                                                                      sweep, flags, message):
    expect_usage_error(bench, capsys, bench_argv(ckpts, tiny_mnist, tmp_path, sweep, *flags), message)
    assert not list(tmp_path.glob(f"{sweep}.*"))


@pytest.mark.parametrize("sweep,flags,message", [
    ("ddim-sweep", ["--ddim-steps", 2000], "--ddim-steps 2000 is more than the model's T = 20"),
    ("guidance-sweep", ["--ws", ""], "nothing to sweep: --ws '' needs a --classifier"),
    ("guidance-sweep", ["--ws", "nan"], "--ws: must be non-negative, got nan"),
    ("restoration", ["--noise-std", "nan"], "--noise-std: must be positive, got nan"),
    ("restoration", ["--resample", 0], "--resample: must be positive, got 0"),
])
def test_bench_with_nothing_to_do_or_nonsense_keeps_the_earlier_results(capsys, ckpts, tiny_mnist, tmp_path,
                                                                        no_work, sweep, flags, message):
    (tmp_path / f"{sweep}.json").write_text("earlier results")
    expect_usage_error(bench, capsys, bench_argv(ckpts, tiny_mnist, tmp_path, sweep, *flags), message)
    assert (tmp_path / f"{sweep}.json").read_text() == "earlier results"
    assert not (tmp_path / f"{sweep}.txt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_restore_stops_on_ctrl_c_or_sigterm_in_one_line(ckpts, tiny_mnist, tmp_path, signum):
    argv = restore_argv(ckpts / "ddpm" / "ckpt.pt", tiny_mnist, tmp_path, "--tasks", "inpaint-left",
                        "--resample", 100000)  # hours of restoring
    proc = subprocess.Popen([sys.executable, str(ROOT / "restore.py"), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    err, deadline = "", time.time() + 120
    while "it/s]" not in err and proc.poll() is None and time.time() < deadline:  # its bar is drawn
        err += proc.stderr.read(1)
    time.sleep(1)  # and its first step under way (a signal inside tqdm's own setup leaves the bar uncleared)
    proc.send_signal(signum)
    err += proc.communicate(timeout=120)[1]
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert lines[-1] == f"restore.py: stopped; the grids of the tasks that finished are in {tmp_path}"


def test_restore_says_one_line_for_a_config_without_schedule(capsys, ckpts, tiny_mnist, tmp_path, no_work):
    ckpt = torch.load(ckpts / "ddpm" / "ckpt.pt", weights_only=True)
    del ckpt["config"]["schedule"]
    torch.save(ckpt, tmp_path / "edited.pt")
    expect_usage_error(restore, capsys, restore_argv(tmp_path / "edited.pt", tiny_mnist, tmp_path),
                       "edited.pt: its weights do not fit its own config; it is damaged")


def test_restore_writes_its_pictures_atomically(ckpts, tiny_mnist, tmp_path, monkeypatch):
    renamed = []
    monkeypatch.setattr(restore.os, "replace", lambda src, dst: renamed.append(src) or os.rename(src, dst))
    restore.main(list(map(str, restore_argv(ckpts / "ddpm" / "ckpt.pt", tiny_mnist, tmp_path))))
    assert renamed == [tmp_path / f"denoise.png.{os.getpid()}.tmp.png"]
    assert sorted(os.listdir(tmp_path)) == [".lock", "denoise.png"]


@pytest.mark.parametrize("module,edit", [(ddpm, "image_shape [1, 28]"), (ddpm, "NaN weights"),
                                         (ddpm, "int64 weights"), (restore, "NaN weights"),
                                         (restore, "int64 weights")])
def test_hand_edited_shapes_and_weights_are_refused_not_sampled_blank(capsys, ckpts, tiny_mnist, tmp_path,
                                                                      no_work, module, edit):
    ckpt = torch.load(ckpts / "ddpm" / "ckpt.pt", weights_only=True)
    message = "is not finite floats: damaged"
    if edit == "image_shape [1, 28]":
        ckpt["image_shape"] = [1, 28]
        message = "its image_shape [1, 28] is not (C, H, W): it is damaged"
    elif edit == "NaN weights":
        ckpt["ema"] = {name: torch.full_like(w, math.nan) for name, w in ckpt["ema"].items()}
    else:
        ckpt["ema"] = {name: w.long() for name, w in ckpt["ema"].items()}
    torch.save(ckpt, tmp_path / "edited.pt")
    argv = restore_argv(tmp_path / "edited.pt", tiny_mnist, tmp_path / "o")
    if module is ddpm:
        argv = ["--sample-only", "--ckpt", tmp_path / "edited.pt", "--num-samples", 4, "--device", "cpu",
                "--out-dir", tmp_path / "o"]
    expect_usage_error(module, capsys, argv, message)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")  # no blank pictures


@pytest.mark.parametrize("module,flags,message", [
    (bench, ["--sample-batch-size", 0], "--sample-batch-size: must be positive, got 0"),
    (bench, ["--sample-batch-size", -1], "--sample-batch-size: must be positive, got -1"),
    (bench, ["--seed", "1" * 23], f"--seed: must be in 0..2^31-1, got {'1' * 23}"),
    (bench, ["--classifier", "none.pt"],
     "--classifier none.pt: no such file; train one with conditional.py --train-classifier"),
    (restore, ["--images", "a.png"], "--images a.png: neither a dataset (mnist, "),
])
def test_messages_that_misled_now_say_what_is_wrong(capsys, ckpts, tiny_mnist, tmp_path, no_work, monkeypatch,
                                                    module, flags, message):
    monkeypatch.chdir(tmp_path)  # where a.png is, and none.pt is not
    Image.new("L", (28, 28)).save(tmp_path / "a.png")  # a file, not a folder of images
    argv = restore_argv(ckpts / "ddpm" / "ckpt.pt", tiny_mnist, tmp_path / "o", *flags)
    if module is bench:
        argv = bench_argv(ckpts, tiny_mnist, tmp_path / "o", "guidance-sweep", *flags)
    expect_usage_error(module, capsys, argv, message)


@pytest.mark.slow
def test_bench_refuses_a_folder_that_another_run_holds(ckpts, tiny_mnist, tmp_path):
    (tmp_path / "ddim-sweep.json").write_text("the other run's results")
    lock = ddpm.claim_outputs(tmp_path)  # the other run: a lock of this process, so bench runs in its own
    try:
        r = run_cli("bench.py", *bench_argv(ckpts, tiny_mnist, tmp_path, "ddim-sweep", "--ddim-steps", 1))
    finally:
        lock.close()
    one_line_error(r, f"{tmp_path} is in use by another run")
    assert (tmp_path / "ddim-sweep.json").read_text() == "the other run's results"
