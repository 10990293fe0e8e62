"""The README is the front door: every picture and relative link in it and in samples/README.md
points at a file that exists, a picture stands on its first screen, and each technique script's
section shows a picture of its own from samples/."""
import re

import pytest

from conftest import ROOT

DOCS = ("README.md", "samples/README.md")
TECHNIQUES = ("ddpm.py", "ddim.py", "conditional.py", "latent.py", "restore.py", "flow.py")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)[^)]*\)")  # ![alt](path "title")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*([^)\s]+)[^)]*\)")  # [text](path), not an image


def prose(text):
    """The text without fenced and indented code blocks and inline code, where a `](` is code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = "\n".join(line for line in text.splitlines() if not line.startswith(("    ", "\t")))
    return re.sub(r"`[^`\n]*`", "", text)


def is_relative(target):
    return not re.match(r"[a-z][a-z0-9+.-]*:|#|/", target)  # no scheme, anchor or absolute path


@pytest.mark.parametrize("doc", DOCS)
def test_every_picture_and_relative_link_exists(doc):
    path = ROOT / doc
    text = prose(path.read_text())
    targets = IMAGE.findall(text) + [t for t in LINK.findall(text) if is_relative(t)]
    assert doc != "README.md" or IMAGE.findall(text), "README.md embeds no picture"
    missing = [t for t in targets if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{doc} points at files that do not exist: {missing}"


def test_a_picture_on_the_first_screen():
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert IMAGE.search(first), "no ![...](...) picture in README.md's first 25 lines"


def section(text, heading):
    """The text under a '## heading' line (the heading starts with it) up to the next '## '."""
    lines = text.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith(f"## {heading}")]
    assert len(start) == 1, f"README.md needs exactly one '## {heading}' section, has {len(start)}"
    after = [i for i in range(start[0] + 1, len(lines)) if lines[i].startswith("## ")]
    end = after[0] if after else len(lines)
    return "\n".join(lines[start[0] + 1:end])


@pytest.mark.parametrize("script", TECHNIQUES)
def test_each_technique_section_shows_a_picture_of_its_own(script):
    """At least one embedded picture from samples/ whose name starts with the script's name
    (ddim_mnist_cpu.png for ddim.py): drawn by that script, not borrowed from another."""
    pictures = IMAGE.findall(prose(section((ROOT / "README.md").read_text(), script)))
    own = [p for p in pictures if p.startswith("samples/") and p[8:].startswith(script[:-3] + "_")]
    assert own, f"README.md's ## {script} section embeds no samples/{script[:-3]}_* picture"


# The front-door issue: 400 lines then, and at most 40 for each section a later issue adds (the
# samplers in ddim.py's section, the measured bound in "From the bound to L_simple", flow.py's).
LATER_SECTIONS = ("samplers", "the bound", "flow.py")


def test_the_readme_fits_its_length():
    lines = (ROOT / "README.md").read_text().splitlines()
    limit = 400 + 40 * len(LATER_SECTIONS)
    assert len(lines) <= limit, f"README.md has {len(lines)} lines, at most {limit}"
