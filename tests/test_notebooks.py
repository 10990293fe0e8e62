"""Each script as a notebook under a real Jupyter kernel, as a reader opens it: jupytext turns its
# %% cells into a notebook and Run all trains and samples with the defaults (made tiny by one cell
placed before the last, as a reader would set flags), then a cell main([...]) samples with flags."""
import jupytext
import nbclient
import nbformat
import pytest

from conftest import ROOT

TINY = {"data_dir": None, "base_channels": (8, 8), "num_res_blocks": (1, 1), "timesteps": 20, "steps": (3, 3),
        "batch_size": (8, 8), "sample_every": (0, 0), "sample_batch_size": (16, 16), "num_samples": 16,
        "device": "cpu"}
MORE = {"ddim.py": {"sampling_steps": 5}, "flow.py": {"sampling_steps": 2}, "conditional.py": {"sampling_steps": 2},
        "latent.py": {"ae_steps": (3, 3), "ae_channels": (8, 8), "ae_batch_size": (8, 8)}}
OUTPUTS = {"ddpm.py": ["ckpt.pt", "samples.png", "reverse.gif", "forward.png"],
           "ddim.py": ["ckpt.pt", "samples.png", "interpolation.png", "inversion.png"],
           "conditional.py": ["ckpt.pt", "samples.png", "guidance.png", "mixing.png"],
           "latent.py": ["ae.pt", "ckpt.pt", "samples.png", "reconstructions.png"],
           "flow.py": ["ckpt.pt", "samples.png", "reverse.gif", "forward.png"]}


@pytest.mark.slow  # a real process or kernel
@pytest.mark.parametrize("script", sorted(OUTPUTS))
def test_script_runs_as_a_notebook(script, tiny_mnist, tmp_path):
    nb = jupytext.read(ROOT / script)
    assert nb.cells[-1].source.endswith('if __name__ == "__main__":\n    main()')
    tiny = {**TINY, "data_dir": str(tiny_mnist), **MORE.get(script, {})}
    if script == "flow.py":  # a path, not T steps
        del tiny["timesteps"]
    nb.cells.insert(-1, nbformat.v4.new_code_cell(
        f"for name, value in {tiny!r}.items():\n    FLAGS[name] = (value, *FLAGS[name][1:])"))
    nb.cells.append(nbformat.v4.new_code_cell(
        'import sys\nassert sys.argv[1:2] == ["-f"]  # the kernel\'s own argv, which main() must not read\n'
        f'ema = main(["--sample-only", "--ckpt", "runs/{script[:-3]}/ckpt.pt", "--num-samples", "4", '
        '"--out-dir", "again"])\nprint(type(ema).__name__)'))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    out = tmp_path / "runs" / script[:-3]
    for name in OUTPUTS[script]:
        assert (out / name).is_file(), name
    assert (tmp_path / "again" / "samples.png").is_file()
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "UNet" in printed


@pytest.mark.slow  # a real process or kernel
def test_restore_runs_as_a_notebook(tiny_mnist, tmp_path):
    """restore.py trains nothing: Run all restores test images with a (tiny) ddpm.py checkpoint."""
    import ddpm
    ddpm.main(["--data-dir", str(tiny_mnist), "--out-dir", str(tmp_path / "ddpm"), "--device", "cpu",
               "--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20", "--steps", "2",
               "--batch-size", "8", "--sample-batch-size", "4", "--num-samples", "4"])
    nb = jupytext.read(ROOT / "restore.py")
    assert nb.cells[-1].source.endswith('if __name__ == "__main__":\n    main()')
    tiny = {"ckpt": str(tmp_path / "ddpm" / "ckpt.pt"), "data_dir": str(tiny_mnist), "num_images": 2, "restore_steps": 3,
            "device": "cpu"}
    nb.cells.insert(-1, nbformat.v4.new_code_cell(
        f"for name, value in {tiny!r}.items():\n    FLAGS[name] = (value, *FLAGS[name][1:])"))
    nb.cells.append(nbformat.v4.new_code_cell(
        'results = main(["--tasks", "superres", "--out-dir", "again"])\nprint(sorted(results))'))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    for task in ("denoise", "inpaint-center", "inpaint-left", "inpaint-random", "superres"):
        assert (tmp_path / "runs" / "restore" / f"{task}.png").is_file(), task
    assert (tmp_path / "again" / "superres.png").is_file()
    assert "['superres']" in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
