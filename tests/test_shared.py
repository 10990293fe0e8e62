"""The four scripts repeat each other on purpose: where a section carries no new idea its text is
the same in every script, so that `diff ddpm.py ddim.py` shows the technique and little else.
These tests keep the copies from drifting apart by accident."""
import ast
import difflib

import pytest

from conftest import ROOT

SCRIPTS = ("ddpm.py", "ddim.py", "conditional.py", "latent.py")

# Top-level names that are meant to differ: the technique itself. Every other function, class or
# constant that two scripts define must be the same text in both.
PER_SCRIPT = {"SCRIPT", "PRESETS", "RUN_FLAGS", "build_parser", "parse_args", "train", "generate",
              "write_samples", "main"}
DIFFERS = {  # name: the scripts whose copy is changed by their technique
    "UNet": {"conditional.py"},  # a class embedding added to the time embedding
    "build_model": {"conditional.py"},
    "load_images": {"conditional.py"},  # the labels come too
    "get_batch": {"conditional.py"},
    "loss_fn": {"conditional.py"},
    "load_checkpoint": {"conditional.py"},
    "save_forward_strip": {"conditional.py"},
    "check_image_size": {"latent.py"},  # the U-Net runs on the latents, the autoencoder on the images
}


def definitions(script):
    """{name: source text} of the top-level functions, classes and constants of a script."""
    source = (ROOT / script).read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(source, node)
    return found


DEFS = {s: definitions(s) for s in SCRIPTS}
SHARED = sorted({name for s in SCRIPTS for name in DEFS[s]
                 if name not in PER_SCRIPT and sum(name in DEFS[t] for t in SCRIPTS) > 1})


@pytest.mark.parametrize("name", SHARED)
def test_shared_definitions_are_the_same_text(name):
    copies = {s: DEFS[s][name] for s in SCRIPTS if name in DEFS[s] and s not in DIFFERS.get(name, ())}
    first, *others = copies
    for other in others:
        diff = "\n".join(difflib.unified_diff(copies[first].splitlines(), copies[other].splitlines(), first,
                                              other, lineterm=""))
        assert copies[first] == copies[other], f"{name} drifted apart:\n{diff}"


def test_the_shared_core_is_in_every_script():
    core = ("Parser", "make_betas", "q_sample", "timestep_embedding", "ResBlock", "Attention", "ema_update",
            "save_checkpoint", "save_grid", "save_gif", "setup_device")
    for script in SCRIPTS:
        assert set(core) <= DEFS[script].keys(), (script, set(core) - DEFS[script].keys())


def test_every_ddim_sampler_is_ddim_pys():
    for name in ("sampling_timesteps", "ddim_sigma", "ddim_step", "ddim_sample_loop"):
        assert all(DEFS[s][name] == DEFS["ddim.py"][name] for s in ("conditional.py", "latent.py")), name


@pytest.mark.parametrize("name", sorted(DIFFERS))
def test_every_listed_difference_is_real(name):
    """An entry of DIFFERS whose copy has become the same again would hide nothing: remove it."""
    for script in DIFFERS[name]:
        assert DEFS[script].get(name) not in (None, DEFS["ddpm.py"][name]), (name, script)


def test_same_sections_in_the_same_order():
    sections = lambda s: [line for line in (ROOT / s).read_text().splitlines() if line.startswith("# %%")]
    assert sections("ddpm.py") == ["# %% Config", "# %% Noise schedule", "# %% Model", "# %% Data",
                                   "# %% Training", "# %% Sampling", "# %% Main"]
    for script in SCRIPTS[1:]:
        assert sections(script) == sections("ddpm.py"), script
