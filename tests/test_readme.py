"""The README as a user reads it: every Python block runs as written, every link to a file of the repository
points to one, and it stays a guide (at most 300 lines)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_is_a_guide_not_a_notebook():
    assert len(README.splitlines()) <= 300 and BLOCKS


@pytest.mark.parametrize("block", BLOCKS)
def test_every_python_block_runs_as_written(block, tmp_path, request):
    """In a fresh interpreter, from an empty folder, with the repository on the path as after a clone; the block
    that classifies new images finds what the README's commands before it made there (its models/my_images, from
    the own_model fixture, and a new_photo.jpg)."""
    if "models/my_images" in block:
        own = request.getfixturevalue("own_model")
        shutil.copytree(own["models"], tmp_path / "models" / "my_images")
        shutil.copy(own["photos"] / "red_panda" / "0.jpg", tmp_path / "new_photo.jpg")
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_citation_is_the_papers():
    """CITATION.cff is valid YAML naming the paper the README's BibTeX names."""
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    paper = cff["preferred-citation"]
    assert cff["cff-version"] == "1.2.0" and cff["authors"] and paper["doi"] == "10.48550/arXiv.2410.07854"
    bibtex = re.search(r"```bibtex\n(.*?)```", README, re.S)[1]
    authors = " and ".join(f"{a['family-names']}, {a['given-names']}" for a in paper["authors"])
    assert f"author  = {{{authors}}}" in bibtex and "2410.07854" in bibtex
    assert f"year    = {{{paper['year']}}}" in bibtex
    assert paper["title"].split(":")[1].strip() in bibtex


def test_every_local_link_points_to_a_file():
    links = [link for link in re.findall(r"\]\(([^)#]+)\)", README) if not link.startswith("http")]
    assert links and all((REPO / link).exists() for link in links), [link for link in links
                                                                      if not (REPO / link).exists()]


def test_the_model_file_runs_the_readme_block_alone(tmp_path):
    """hegraphadapter.py copied alone into an empty folder runs the README's block about it: it needs PyTorch and
    nothing of this repository (the copy is the module imported, and no module of fewshot is loaded)."""
    block = next(b for b in BLOCKS if "from hegraphadapter import" in b)
    (tmp_path / "hegraphadapter.py").write_bytes((REPO / "hegraphadapter.py").read_bytes())
    check = ("\nimport sys, hegraphadapter\nprint(hegraphadapter.__file__)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fewshot', 'train', 'extract_features')))")
    proc = subprocess.run([sys.executable, "-c", block + check], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    *_, where, loaded = proc.stdout.strip().splitlines()
    assert Path(where) == tmp_path / "hegraphadapter.py" and loaded == "[]"
