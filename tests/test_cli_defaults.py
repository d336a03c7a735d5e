"""Every command line's defaults equal its API's (issue 14): a default lives in one place.

Each CLI module has ``build_parser()`` and ``main(...)``. An option generated from a config dataclass
(:func:`core.cli.add_config_arguments`) must default to the value of the config ``main`` uses when called
without it; any other option must default to ``main``'s parameter of the same name.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest

from core.cli import generated_options
from tests.test_cli_polish import cli_modules


def _normal(value):
    """Compare CLI and API values across the spellings they legitimately differ in."""
    if isinstance(value, (list, tuple)):
        return tuple(_normal(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return value


def _config_defaults(main) -> list:
    """The config instances ``main`` uses by default, nested configs included."""
    found = []
    for parameter in inspect.signature(main).parameters.values():
        default = parameter.default
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            found.append(default)
    queue = list(found)
    while queue:
        config = queue.pop()
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                found.append(value)
                queue.append(value)
    return found


@pytest.mark.parametrize("module_name", cli_modules())
def test_every_cli_default_is_the_api_default(module_name):
    module = importlib.import_module(module_name)
    assert hasattr(module, "build_parser"), f"{module_name}: a CLI module exposes build_parser()"
    parser = module.build_parser()
    parameters = inspect.signature(module.main).parameters
    configs = _config_defaults(module.main)
    generated = generated_options(parser)
    checked = 0
    for action in parser._actions:
        if action.dest in ("help", "version") or action.default is None and action.dest not in parameters:
            continue
        if action.dest in generated:
            cls, field = generated[action.dest]
            owners = [c for c in configs if isinstance(c, cls)]
            expected = (
                getattr(owners[0], field)
                if owners
                else next(f.default for f in dataclasses.fields(cls) if f.name == field)
            )
        elif action.dest in parameters and parameters[action.dest].default is not inspect.Parameter.empty:
            expected = parameters[action.dest].default
        else:
            continue
        assert _normal(action.default) == _normal(expected), (
            f"{module_name}: {action.option_strings[0]} defaults to {action.default!r}, the API to {expected!r}"
        )
        checked += 1
    assert checked or not [a for a in parser._actions if a.option_strings and a.dest != "help"], module_name


STEP_CONFIGS = [
    ("pipeline.match_dense", "DenseMatchConfig"),
    ("pipeline.reconstruct", "ReconstructConfig"),
    ("pipeline.pairs", "PairsConfig"),
    ("pipeline.triangulate", "TriangulationConfig"),
    ("pipeline.retrieval", "RetrievalConfig"),
    ("localization.aachen", "AachenConfig"),
    ("localization.inloc", "InLocConfig"),
    ("localization.evaluate", "EvaluateConfig"),
    ("datasets.synthetic", "SceneConfig"),
    ("recipes.imc2022", "IMC2022Config"),
    ("recipes.imc2023", "IMC2023Config"),
    ("recipes.train_loftr", "TrainConfig"),
]


@pytest.mark.parametrize("module_name,config_name", STEP_CONFIGS)
def test_a_steps_options_are_generated_from_its_config(module_name, config_name):
    """A step's command line is generated from its config dataclass (core.cli), not restated by hand."""
    module = importlib.import_module(module_name)
    config = getattr(module, config_name)
    parser = module.build_parser()
    generated = {field for owner, field in generated_options(parser).values() if owner is config}
    assert generated, f"{module_name}: no option generated from {config_name}"
