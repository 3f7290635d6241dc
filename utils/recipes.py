"""Recipes: a paper's whole training and evaluation setup as one small YAML file under `configs/`.

A recipe maps train_ds.py flag names (argparse destinations: `sample_rates`, `lora_r`,
`early_fusion`, ...) to values. `train_ds.py --recipe NAME|PATH` reads one; every flag given on
the command line overrides it, and fields it leaves out keep the built-in defaults. A value is
checked against its flag: its type (bool switches take true/false, numbers stay numbers), its
choices, and for the "||"- and ","-joined flags (`dataset`, `sample_rates`, ...) a YAML list is
accepted and joined. Errors name the file, the key and what was expected (`RecipeError`).

This module reads and checks recipe files; `utils.config` decides what wins over what.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPE_SUFFIXES = (".yaml", ".yml")
DEFAULT_RECIPE = "m2sa"
# flags that describe one invocation, not an experiment
NOT_IN_RECIPES = frozenset({"local_rank", "recipe", "print_config", "force_unlock", "help"})
# the flags whose string value is a list, and how train_ds.py joins its items
LIST_SEPARATORS: dict[str, str] = {
    "dataset": "||",
    "sample_rates": ",",
    "sem_seg_data": "||",
    "refer_seg_data": "||",
    "vqa_data": "||",
    "reason_seg_data": "||",
    "multi_part_reason_seg_data": "||",
    "lasagna_sem_seg_data": "||",
    "custom_data": "||",
    "val_dataset": "||",
    "lora_target_modules": ",",
}
BOOLEAN_ACTIONS = (
    argparse.BooleanOptionalAction,
    argparse._StoreTrueAction,  # noqa: SLF001 - argparse exposes no public class for it
    argparse._StoreFalseAction,  # noqa: SLF001
)


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown name, unreadable file, unknown key, wrong value."""


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its name (the file stem), path and checked flag values."""

    name: str
    path: Path
    values: dict[str, Any]


def available_recipes() -> list[str]:
    """The recipe names shipped in `configs/`."""
    return sorted(p.stem for p in RECIPE_DIR.iterdir() if p.suffix in RECIPE_SUFFIXES)


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's file (`lisa` -> configs/lisa.yaml) or a path to a recipe file."""
    path = Path(name_or_path)
    if path.suffix in RECIPE_SUFFIXES or len(path.parts) > 1:
        if not path.is_file():
            raise RecipeError(f"--recipe {name_or_path}: no such recipe file")
        return path
    for suffix in RECIPE_SUFFIXES:
        candidate = RECIPE_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"--recipe {name_or_path!r}: unknown recipe; shipped recipes: "
        f"{', '.join(available_recipes())} (or give the path of a .yaml recipe file)"
    )


def load_recipe(name_or_path: str, parser: argparse.ArgumentParser) -> Recipe:
    """Read and check a recipe against `parser`'s flags (RecipeError naming file and key)."""
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{path}: not a readable YAML file: {error}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: expected a mapping of flag names to values, not {type(raw).__name__}"
        )
    actions = {action.dest: action for action in parser._actions}  # noqa: SLF001
    values = {key: check_value(path, key, value, actions) for key, value in raw.items()}
    return Recipe(name=path.stem, path=path, values=values)


def check_value(path: Path, key: object, value: Any, actions: dict[str, argparse.Action]) -> Any:
    """`value` as the flag `key` would have parsed it; RecipeError when it cannot be."""
    if not isinstance(key, str) or key not in actions or key in NOT_IN_RECIPES:
        raise RecipeError(
            f"{path}: unknown key {key!r}; keys are train_ds.py flag names without '--' "
            "(e.g. sample_rates, lora_r, early_fusion; `python train_ds.py --help` lists them)"
        )
    action = actions[key]
    if key in LIST_SEPARATORS and isinstance(value, list):
        value = LIST_SEPARATORS[key].join(str(item) for item in value)
    if isinstance(action, BOOLEAN_ACTIONS):
        return expect(path, key, value, bool, "true or false")
    kind = action.type or str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    checked = expect(path, key, value, kind, f"a {kind.__name__}")
    if action.choices is not None and checked not in action.choices:
        raise RecipeError(
            f"{path}: key {key!r}: {checked!r} is not one of {', '.join(map(str, action.choices))}"
        )
    return checked


def expect(path: Path, key: str, value: Any, kind: type, expected: str) -> Any:
    """`value` when it is a `kind` (bools are not numbers here), else RecipeError."""
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise RecipeError(f"{path}: key {key!r}: expected {expected}, got {value!r}")
