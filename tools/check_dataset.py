"""The dataset doctor: `python tools/check_dataset.py [--recipe NAME|PATH] --dataset_dir DIR
[train_ds.py data flags] [--all] [--quick] [--workers N]`.

Without `--all` it checks what the train_ds.py run with the same flags reads: every training
source of its mix (none with `--eval_only`) and every `--val_dataset` set (none with
`--no_eval`), resolved as train_ds.py resolves them (`--recipe`, else the m2sa recipe, under
the flags given). `--all` checks every family, split and validation file found under
`--dataset_dir` instead. Every image and mask is opened and decoded, in `--workers` processes;
`--quick` only checks that files exist and annotations parse (what training start checks).

Prints one line per source (`[OK]`, `[BAD]` or `[UNUSABLE]`, with its counts), its errors and
warnings (each naming the file, the record and what was expected), then a summary. Exits 0
when every source is clean or has only warnings, 1 when any has errors, cannot be opened, or
nothing was checked, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import TrainConfig, resolve_config  # noqa: E402
from utils.datasets.doctor import (  # noqa: E402
    MAX_LISTED_PROBLEMS,
    Check,
    default_workers,
    discover_checks,
    format_report,
    run_checks,
    summary,
    training_checks,
    validation_checks,
)
from utils.datasets.mixer import FAMILY_BUILDERS  # noqa: E402
from utils.flags import USAGE_ERROR, explicit_flags  # noqa: E402
from utils.flags import build_parser as build_train_parser  # noqa: E402

PROG = "check_dataset.py"
CLEAN, FOUND_ERRORS = 0, 1
# train_ds.py flags that choose what a run reads: --all reads everything instead
SELECTING_FLAGS = (
    "recipe",
    "dataset",
    *(f"{family}_data" for family in FAMILY_BUILDERS),
    "val_dataset",
    "val_json_name",
    "eval_only",
    "no_eval",
)
DEEP_NOTE = "note: --deep is the default now (every image and mask is decoded); drop it"


@dataclass(frozen=True)
class DoctorArgs:
    """The resolved train_ds.py configuration and the doctor's own flags."""

    config: TrainConfig
    everything: bool
    quick: bool
    workers: int
    max_listed: int
    deep_given: bool


def build_parser() -> argparse.ArgumentParser:
    """The doctor's own flags; every other flag is train_ds.py's."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [--all] [--quick] [--workers N] [--max_listed N] [train_ds.py flags]",
        description=__doc__.split("\n\n")[0],
        epilog="Every train_ds.py flag is accepted too (see train_ds.py --help); its --workers "
        "is the doctor's here.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--all",
        dest="everything",
        action="store_true",
        help="check every dataset found under --dataset_dir, not only the run's",
    )
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument(
        "--quick",
        action="store_true",
        help="only check that files exist and annotations parse (what training start checks)",
    )
    depth.add_argument(
        "--deep",
        action="store_true",
        help="accepted for old command lines: decoding every image is the default now",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes checking sources in parallel (default: this machine's CPUs)",
    )
    parser.add_argument(
        "--max_listed",
        type=int,
        default=MAX_LISTED_PROBLEMS,
        help="errors and warnings listed per source (0: all)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> DoctorArgs:
    """The doctor's flags, and train_ds.py's resolved as train_ds.py does (recipe, then the
    flags given). Its data flags are not checked against each other here (e.g. --sample_rates,
    which the doctor does not use): an unknown family or --val_dataset entry is reported as an
    unusable source. Exits with USAGE_ERROR for a bad flag, a bad recipe, or flags the doctor
    cannot honour together."""
    parser = build_parser()
    own, rest = parser.parse_known_args(argv)
    config = resolve_config(rest, check_data_flags=False, prog=PROG).config
    problem = conflict(own, explicit_flags(build_train_parser(), rest))
    if problem:
        parser.exit(USAGE_ERROR, f"{PROG}: error: {problem}\n")
    return DoctorArgs(config, own.everything, own.quick, own.workers, own.max_listed, own.deep)


def conflict(own: argparse.Namespace, given: dict[str, object]) -> str | None:
    """Why the flags cannot be honoured together, or None."""
    if own.workers < 1:
        return f"--workers {own.workers}: give at least 1"
    if own.max_listed < 0:
        return f"--max_listed {own.max_listed}: give 0 (all) or more"
    if "print_config" in given:
        return "--print_config is train_ds.py's; the doctor prints its report"
    selecting = [f"--{flag}" for flag in SELECTING_FLAGS if flag in given]
    if own.everything and selecting:
        return (
            f"--all checks every dataset under --dataset_dir, so {', '.join(selecting)} "
            "(which choose a run's data) cannot go with it; drop one or the other"
        )
    return None


def checks_of_run(config: TrainConfig) -> list[Check]:
    """What train_ds.py reads with `config`: its training sources unless --eval_only, and its
    validation sets unless --no_eval without --eval_only (train_ds.py's own rule)."""
    root = Path(config.dataset_dir)
    checks: list[Check] = []
    if not config.eval_only:
        checks += training_checks(root, config.family_data(), config.sampling_options())
    if config.eval_only or not config.no_eval:
        checks += validation_checks(root, config.val_dataset, config.val_json_name)
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.deep_given:
        print(DEEP_NOTE, file=sys.stderr)
    root, absent = Path(args.config.dataset_dir), []
    if args.everything:
        checks, absent = discover_checks(root, args.config.sampling_options())
    else:
        checks = checks_of_run(args.config)
    if not checks:
        where = f"no dataset found under {root}" if args.everything else "the run reads no data"
        print(f"nothing to check: {where}")
        return FOUND_ERRORS
    reports = run_checks(checks, deep=not args.quick, workers=args.workers)
    print(format_report(reports, args.max_listed))
    if absent:
        print(f"not found under {root}, not checked: {', '.join(absent)}")
    print(summary(reports))
    return CLEAN if all(report.usable for report in reports) else FOUND_ERRORS


if __name__ == "__main__":
    sys.exit(main())
