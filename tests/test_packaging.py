"""The built wheel carries what an installed hfrepair needs beyond its Python modules."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_card_template_and_the_demo_endpoints(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "docs"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation, "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("hfrepair-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hfrepair/model_cards/merged_model.md" in names
    assert {"hfrepair/demo_endpoints/training.json", "hfrepair/demo_endpoints/resnet-a/model.safetensors",
            "hfrepair/demo_endpoints/resnet-b/config.json"} <= set(names)  # `hfrepair demo` runs without training
    assert "hfrepair/distributed.py" in names and "hfrepair/models/resnet.py" in names
    assert not any(name.startswith("tests/") for name in names)
