"""Plain code and one meaning per flag: the constructs that hid what the code does are gone, a flag
means the same in every script, the traps a careful reading found stay mended, the memory check
reads the device it guards, and the CUDA column of FLAGS runs (on the CPU, tiny) as a GPU user's
command would."""
import ast
import json
import os
import re

import pytest
import torch

import bench
import conditional
import ddim
import ddpm
import flow
import latent
import restore
from conftest import ROOT

SCRIPTS = ("ddpm.py", "ddim.py", "conditional.py", "latent.py", "restore.py", "evaluate.py", "bench.py", "flow.py")
MODULES = {"ddpm": ddpm, "ddim": ddim, "conditional": conditional, "latent": latent}
SAMPLERS = (ddim, conditional, latent)  # the scripts that sample on fewer steps than T
TINY = ["--device", "cpu", "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20",
        "--batch-size", "8", "--sample-batch-size", "16", "--num-samples", "4", "--log-every", "5",
        "--sample-every", "0", "--steps", "2"]

# A riddle each: a string, list, set or range times a bool; a lambda doing control flow; a
# comprehension or conditional expression run for its side effect; __import__; print() as a value;
# a checkpoint that is False or a dict; a flag list that rests on dict order; a bool written as 1.
COMPRESSED = {
    "a sequence times a bool": r"\*\s*bool\(|\*\s*\(not |\)\s+\*\s+f?[\"']|^\s*\*\s+f?[\"']|[\"']\s*\*\s*\w",
    "a lambda doing control flow": r"lambda[^:]*:.*\b(if|sys\.exit)\b",
    "a comprehension for its side effect": r"^\s*\[[^=]*\bfor\b[^=]*\]\s*(#.*)?$",
    "an expression statement with if/else": r"^\s*[\w.]+\(.*\) if .* else None\s*$",
    "__import__": r"__import__\(",
    "print() as a value": r"=\s*print\(",
    "a value that is False or a dict": r"=\s*\(?args\.\w+ or args\.\w+\)? and ",
    "a flag list resting on dict order": r"tuple\(FLAGS\)\[",
    "a bool written as a number": r"batch_first=1\b",
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_compressed_constructs_are_left(script):
    found = []
    for n, line in enumerate((ROOT / script).read_text().splitlines(), 1):
        for what, pattern in COMPRESSED.items():
            if re.search(pattern, line):
                found.append(f"{script}:{n} {what}: {line.strip()}")
    for node in ast.walk(ast.parse((ROOT / script).read_text())):  # `if x: y` on one line
        if isinstance(node, (ast.If, ast.For, ast.While, ast.With)) and node.body[0].lineno == node.lineno:
            found.append(f"{script}:{node.lineno} a statement after a colon")
    assert not found, "\n".join(found)


def test_the_patterns_find_what_they_name():
    """Each pattern against a line of the kind it names (from the scripts before the rewrite)."""
    examples = {
        "a sequence times a bool": "f\"reverse.gif{', mixing.png' * bool(pairs)}\"",
        "a lambda doing control flow": "on_signal = lambda *_: sys.exit('x') if stop else stop.append(1)",
        "a comprehension for its side effect": "        [signal.signal(s, h) for s, h in previous.items()]",
        "an expression statement with if/else": "        torch.cuda.set_device(device) if cuda else None",
        "__import__": "    __import__('fcntl').lockf(lock, 6)",
        "print() as a value": "            data = print(f'no inversion figure: {e}')",
        "a value that is False or a dict": "ckpt = (args.sample_only or args.resume) and load(p)",
        "a flag list resting on dict order": "RUN_FLAGS = tuple(FLAGS)[:7]",
        "a bool written as a number": "nn.MultiheadAttention(ch, heads, batch_first=1)",
    }
    for what, line in examples.items():
        assert re.search(COMPRESSED[what], line), what


# ---- one meaning per flag ----

def test_sampling_steps_and_eta_mean_the_same_in_every_sampler():
    for flag in ("sampling_steps", "eta"):
        helps = {m.SCRIPT: m.FLAGS[flag][2] for m in SAMPLERS}
        assert len(set(helps.values())) == 1, helps
    assert "S = T with --eta 1 is DDPM's Alg. 2" in ddim.FLAGS["sampling_steps"][2]
    assert "sampling_steps" not in ddpm.FLAGS and "eta" not in ddpm.FLAGS  # Alg. 2 alone


def test_no_flag_name_carries_two_meanings():
    """restore.py's corruption noise and reverse steps have names of their own: --sigma and --steps
    are ddpm.py's posterior variance and training steps, --batch-size a training batch."""
    assert {"sigma", "steps", "batch_size"}.isdisjoint(restore.FLAGS)
    assert {"noise_std", "restore_steps", "sample_batch_size"} <= set(restore.FLAGS)
    options = {a.dest for a in bench.build_parser()._actions}
    assert {"sigma", "steps", "batch_size"}.isdisjoint(options) and "noise_std" in options


@pytest.mark.parametrize("module", SAMPLERS, ids=lambda m: m.SCRIPT)
def test_eta_above_1_is_refused(module, capsys, tmp_path):
    """Trap 4: with eta > 1, 1 - ab_prev - sigma^2 < 0, and the clamp silently dropped the direction."""
    with pytest.raises(SystemExit) as e:
        module.main(["--eta", "1.5", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--eta: must be in [0, 1], got 1.5" in err and err.count("\n") == 1


def test_latent_refuses_zero_sampling_steps(capsys, tmp_path):
    """Trap 6: --sampling-steps 0 was DDPM there, and --eta was then ignored without a word."""
    with pytest.raises(SystemExit) as e:
        latent.main(["--sampling-steps", "0", "--eta", "0", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "--sampling-steps: must be positive, got 0" in capsys.readouterr().err


def test_classifier_guidance_defaults_to_its_own_best_scale():
    """Trap 3: --guidance left out was 1 in both modes, classifier guidance's worst measured s."""
    assert conditional.FLAGS["guidance"][0] is None
    assert conditional.GUIDANCE == {"free": 1.0, "classifier": 16.0}


def test_a_float_that_float32_cannot_hold_is_refused():
    parse = ddpm.valid(float, lambda v: v >= 0, "non-negative")
    assert parse("3.4e38") == 3.4e38
    for text in ("1e39", "-1e39", "inf", "nan"):
        with pytest.raises(ddpm.argparse.ArgumentTypeError):
            parse(text)


# ---- trap 5: the non-finite message names the right step ----

class TwoWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))


def test_a_weight_gone_non_finite_with_a_finite_loss_is_named_as_such(tmp_path):
    model, calls = TwoWeights(), []
    def batch_loss(net, gen):  # the loss reads only a; b turns nan at step 3
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                net.b.fill_(float("nan"))
        return (net.a ** 2).sum()
    args = ddpm.argparse.Namespace(steps=100, lr=1e-3, warmup=0, lr_decay=False, compile=False, seed=0,
                                   batch_size=1, log_every=5, ckpt_every=1000, sample_every=0, grad_clip=1.0,
                                   ema_decay=0.9)
    with pytest.raises(SystemExit) as e:
        ddpm.train(model, ddpm.copy.deepcopy(model), torch.optim.SGD(model.parameters(), 0.1), batch_loss,
                   args, 0, tmp_path / "c.pt", {})
    message = str(e.value.code)
    assert "a weight became non-finite between steps 1 and 5" in message, message
    assert "loss became non-finite" not in message and not (tmp_path / "c.pt").exists()


def test_a_non_finite_loss_names_its_own_step():
    finite = torch.tensor([True, True, False, False, True])
    message = ddpm.non_finite_message(finite, 15, ROOT / "no-such-file.pt")
    assert "the loss became non-finite at step 13; stopped. No checkpoint was saved" in message


# ---- the memory check ----

def fake_machine(monkeypatch, gigabytes):
    """os.sysconf of a machine with this much memory (4 KiB pages); every other name as it is."""
    real = os.sysconf
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": int(gigabytes * 1e9 / 4096)}
    monkeypatch.setattr(os, "sysconf", lambda name: pages.get(name) or real(name))


def test_on_cuda_the_check_reads_the_gpus_free_memory(monkeypatch):
    """Trap 1: the host's memory was checked whatever the device; a 12.7 GB host refused the CUDA
    defaults. On CUDA the GPU's free memory decides (mem_get_info patched: no GPU here)."""
    fake_machine(monkeypatch, 1)  # a host too small for anything
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(8e9), int(16e9)))
    cuda = torch.device("cuda", 0)
    ddpm.check_memory(int(7e9), "a batch", cuda)  # fits the GPU's 8 GB free
    with pytest.raises(ValueError, match=r"a batch needs 9.0 GB, over 8.0 GB \(free on the GPU\)"):
        ddpm.check_memory(int(9e9), "a batch", cuda)


def test_on_the_cpu_half_the_memory_and_on_windows_no_check(monkeypatch):
    fake_machine(monkeypatch, 12.7)
    ddpm.check_memory(int(6e9), "a batch")
    with pytest.raises(ValueError, match="over 6.3 GB"):
        ddpm.check_memory(int(7e9), "a batch")
    monkeypatch.delattr(os, "sysconf")  # as on Windows: no figure, so no check
    ddpm.check_memory(int(1e15), "a batch")


def test_the_estimates_are_within_1_5x_of_the_measured_peaks():
    """samples/memory_cpu.json: `python bench.py memory --device cpu`, peak resident memory measured
    on this project's CPU machine at batches 64, 256 and 1,000, CUDA and CPU columns, each script."""
    rows = json.loads((ROOT / "samples" / "memory_cpu.json").read_text())["rows"]
    assert len(rows) == 18 and {r["batch"] for r in rows} == {64, 256, 1000}
    for r in rows:
        module = MODULES[r["script"]]
        config = {k: v[0][r["column"] == "cpu"] if type(v[0]) is tuple else v[0] for k, v in module.FLAGS.items()}
        if r["script"] == "latent":
            estimate = latent.decoding_bytes(r["batch"], [1, 28, 28], config["ae_channels"])
        else:
            batch = 2 * r["batch"] if r["script"] == "conditional" else r["batch"]
            estimate = module.sampling_bytes(batch, [1, 28, 28], config["base_channels"])
        assert estimate == r["estimate"]  # the committed estimate is the one measured against
        assert 1 / 1.5 <= r["measured"] / estimate <= 1.5, r


# ---- the CUDA column of FLAGS, run on the CPU as a GPU user runs it ----

def cuda_column(module):
    """Every flag with a (CUDA, CPU) pair of defaults, at its CUDA value."""
    argv = []
    for name, (default, kind, _) in module.FLAGS.items():
        if type(default) is not tuple:
            continue
        flag = "--" + name.replace("_", "-")
        if kind is None:  # a switch
            argv.append(flag if default[0] else "--no-" + flag[2:])
        else:
            argv += [flag, str(default[0])]
    return argv


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_cuda_defaults_run_on_a_machine_with_12_7_gb(name, tiny_mnist, tmp_path, monkeypatch):
    """Trap 1 end to end: the CUDA column of every trained script, on a host of 12.7 GB (a Colab VM),
    with only the run's length and the device changed: T = 20, two steps, two samples."""
    fake_machine(monkeypatch, 12.7)
    module = MODULES[name]
    argv = [*cuda_column(module), "--device", "cpu", "--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path),
            "--timesteps", "20", "--steps", "2", "--num-samples", "2"]
    if name == "latent":
        argv += ["--ae-steps", "2"]
    if module in SAMPLERS:
        argv += ["--sampling-steps", "4"]
    assert "--sample-batch-size" in argv and argv[argv.index("--sample-batch-size") + 1] == "1000"
    assert module.main(argv) is not None
    assert (tmp_path / "samples.png").is_file()
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert config["base_channels"] == module.FLAGS["base_channels"][0][0]  # the CUDA width


# ---- sampling a shipped checkpoint needs no dataset; old checkpoints keep loading ----

def test_ddim_samples_a_checkpoint_without_fetching_its_dataset(tmp_path, capsys):
    """Trap 2: ddim.py --sample-only tried to download MNIST for its inversion figure."""
    data = tmp_path / "data"
    ddim.main(["--sample-only", "--ckpt", str(ROOT / "checkpoints" / "ddpm_mnist.pt"), "--out-dir",
               str(tmp_path / "o"), "--data-dir", str(data), "--num-samples", "2", "--sampling-steps", "2",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert not data.exists() and "no inversion figure: mnist is not in" in out
    assert "DDIM, eta 0, 2 steps, 2 network evaluations an image" in out
    assert (tmp_path / "o" / "samples.png").is_file() and not (tmp_path / "o" / "inversion.png").exists()


def test_a_checkpoint_that_predates_a_flag_takes_its_default(tiny_mnist, tmp_path, capsys):
    ddpm.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path), *TINY])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for flag in ("schedule", "sigma", "lr_decay"):  # a model flag, a sampling flag, a recipe flag
        del ckpt["config"][flag]
    torch.save(ckpt, tmp_path / "old.pt")
    capsys.readouterr()
    ddpm.main(["--sample-only", "--ckpt", str(tmp_path / "old.pt"), "--out-dir", str(tmp_path / "s"),
               "--num-samples", "2"])
    assert "Alg. 2, 20 steps, 20 network evaluations an image" in capsys.readouterr().out
    ddim.main(["--sample-only", "--ckpt", str(tmp_path / "old.pt"), "--out-dir", str(tmp_path / "d"),
               "--num-samples", "2", "--sampling-steps", "3", "--data-dir", str(tiny_mnist)])
    assert (tmp_path / "d" / "inversion.png").is_file()  # the data on disk is used
    ckpt["ema"] = torch.zeros(3)  # hand-edited: weights that are no state dict end in one line
    torch.save(ckpt, tmp_path / "bad.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ddpm.main(["--sample-only", "--ckpt", str(tmp_path / "bad.pt"), "--out-dir", str(tmp_path / "b")])
    assert e.value.code == 2 and "its ema is not a state dict" in capsys.readouterr().err


def test_run_flags_are_named_and_come_first():
    """RUN_FLAGS name the flags a checkpoint fixes; FLAGS lists them first, in that order."""
    for module in (ddpm, ddim, conditional, latent, flow):
        assert list(module.FLAGS)[:len(module.RUN_FLAGS)] == list(module.RUN_FLAGS)
