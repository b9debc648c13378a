"""The README keeps its promises: its links lead somewhere, its recipes exist, and every opt-in its Safety
paragraph names is a real switch, off by default (a renamed flag would leave users reading a promise about
nothing)."""

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_local_link_and_recipe_the_readme_names_exists():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    assert links, "the README links its docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing
    recipes = set(re.findall(r"recipes/[a-z0-9_]+\.yaml", README))
    assert {"recipes/demo.yaml", "recipes/demo_sparsifiner.yaml", "recipes/demo_budget.yaml"} <= recipes
    assert [r for r in recipes if not (ROOT / r).exists()] == []


def test_the_license_is_the_one_pyproject_declares():
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_every_opt_in_of_the_safety_paragraph_is_a_switch_that_is_off_by_default():
    safety = README[README.index("## Safety"):]
    safety = safety[:safety.index("\n## ", 1)]
    for named in ("data.allow_pipe: true", "--allow-pipe", "trust_remote_code:", "trust_remote_code=True",
                  "--trust-remote-code", "weights_only=True"):
        assert named in safety, named

    import inspect

    from bootstrap.config import DataConfig
    from eval.clip_benchmark import TRUST_REMOTE_CODE
    from eval.options import add_eval_options
    from students.export import load_openclip_export

    assert DataConfig().allow_pipe is False
    parser = argparse.ArgumentParser()
    add_eval_options(parser)
    assert parser.parse_args([]).allow_pipe is False and parser.parse_args(["--allow-pipe"]).allow_pipe is True
    assert TRUST_REMOTE_CODE == "--trust-remote-code"
    assert inspect.signature(load_openclip_export).parameters["trust_remote_code"].default is False
