"""A relative DeepSpeed config path (trainer.strategy.init_args.config) is found from the current directory or,
failing that, from the directory of the recipe that set it; a missing file is named with every place looked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmpretrain.cli import MMPretrainCLI, config_files, resolve_strategy_config

ROOT = Path(__file__).resolve().parents[1]
ZERO3_RECIPE = ROOT / "recipes/metalm/paper_1p3b_zero3.yaml"
ZERO3_JSON = ROOT / "recipes/deepspeed/zero3_offload.json"
# the smallest model and data the parser accepts, for recipes that only set the trainer
BORING = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel",
          "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule"]

RECIPE = """\
trainer:
  strategy:
    class_path: lightning.pytorch.strategies.DeepSpeedStrategy
    init_args:
      config: {config}
"""


def write_recipe(path: Path, config: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECIPE.format(config=config))
    return path


def write_json(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return path


def test_the_zero3_recipe_names_its_json_relative_to_itself():
    assert "config: ../deepspeed/zero3_offload.json" in ZERO3_RECIPE.read_text()
    assert ZERO3_JSON.is_file()


def test_a_path_beside_the_recipe_is_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = resolve_strategy_config("../deepspeed/zero3_offload.json", [ZERO3_RECIPE])
    assert found.resolve() == ZERO3_JSON.resolve()


def test_the_current_directory_comes_first(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipes/a/run.yaml", "ds.json")
    beside = write_json(tmp_path / "recipes/a/ds.json")
    here = write_json(tmp_path / "work/ds.json")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_strategy_config("ds.json", [recipe]) == Path("ds.json")
    here.unlink()
    assert resolve_strategy_config("ds.json", [recipe]) == beside


def test_only_the_recipe_that_set_the_path_is_consulted(tmp_path, monkeypatch):
    """A later --config that does not mention the DeepSpeed file does not move where it is looked for, and a
    path given on the command line (no recipe wrote it) is relative to the current directory only."""
    setter = write_recipe(tmp_path / "recipes/a/run.yaml", "ds.json")
    write_json(tmp_path / "recipes/a/ds.json")
    other = tmp_path / "recipes/b/more.yaml"
    other.parent.mkdir(parents=True)
    other.write_text("trainer:\n  max_steps: 3\n")
    write_json(tmp_path / "recipes/b/ds.json")  # would be wrong to pick
    monkeypatch.chdir(tmp_path)
    assert resolve_strategy_config("ds.json", [setter, other]) == tmp_path / "recipes/a/ds.json"
    with pytest.raises(ValueError) as err:
        resolve_strategy_config("elsewhere.json", [setter, other])
    message = str(err.value)
    assert os.path.abspath("elsewhere.json") in message and "current directory" in message
    assert "recipes/a" not in message and "recipes/b" not in message


def test_a_missing_file_names_both_places(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipes/metalm/run.yaml", "../deepspeed/none.json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_strategy_config("../deepspeed/none.json", [recipe])
    message = str(err.value)
    assert "trainer.strategy.init_args.config ../deepspeed/none.json" in message
    assert str(tmp_path.parent / "deepspeed/none.json") in message  # from the current directory
    assert str(tmp_path / "recipes/deepspeed/none.json") in message  # from the recipe's directory
    assert f"recipe {recipe}" in message


def test_an_absolute_path_is_looked_for_only_where_it_points(tmp_path):
    with pytest.raises(ValueError, match="no such DeepSpeed config file") as err:
        resolve_strategy_config(tmp_path / "none.json", [])
    assert f"looked for {tmp_path / 'none.json'} (as given). " in str(err.value)
    assert resolve_strategy_config(write_json(tmp_path / "ds.json"), []) == tmp_path / "ds.json"


# ----------------------------------------------------------------------------------- through the CLI


class _Stop(Exception):
    """Raised to end a CLI run early."""


class ParseOnly(MMPretrainCLI):
    """Parses the command line, records the result and stops before any check."""

    seen: list = []

    def before_instantiate_classes(self) -> None:
        ParseOnly.seen.append((self.config, self.subcommand))
        raise _Stop


class CheckOnly(ParseOnly):
    """Parses and runs the checks before instantiation (before_instantiate_classes), builds nothing."""

    def before_instantiate_classes(self) -> None:
        MMPretrainCLI.before_instantiate_classes(self)
        super().before_instantiate_classes()


def _parse(cli: type[ParseOnly], args: list[str]):
    ParseOnly.seen.clear()
    with pytest.raises(_Stop):
        cli(args=args)
    return ParseOnly.seen[-1]


def test_config_files_lists_the_recipes_of_the_command_line(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipes/run.yaml", "x.json")
    extra = tmp_path / "more.yaml"
    extra.write_text("trainer:\n  max_steps: 3\n")
    monkeypatch.chdir(tmp_path)
    config, subcommand = _parse(ParseOnly, ["fit", "--config", "recipes/run.yaml", "--config", "more.yaml", *BORING])
    monkeypatch.chdir(ROOT)  # the paths were fixed at parse time
    assert config_files(config, subcommand) == [recipe, extra]


def test_the_cli_finds_the_recipe_relative_json_from_another_directory(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.chdir(tmp_path)
    config, subcommand = _parse(CheckOnly, ["fit", "--config", str(ZERO3_RECIPE), "--trainer.logger", "false"])
    config = config[subcommand]
    # rewritten to the file that was checked, so that DeepSpeedStrategy reads it from this directory too
    assert Path(config.trainer.strategy.init_args.config) == ZERO3_JSON.resolve()


def test_the_cli_refuses_a_missing_json_naming_both_places(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    recipe = write_recipe(tmp_path / "recipes/metalm/run.yaml", "../deepspeed/none.json")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ValueError) as err:
        _parse(CheckOnly, ["fit", "--config", str(recipe), *BORING])
    message = str(err.value)
    assert str(tmp_path / "deepspeed/none.json") in message  # from the current directory
    assert str(tmp_path / "recipes/deepspeed/none.json") in message  # from the recipe's directory
