"""Write the JSON twin of every pickled refs file:
`python tools/convert_refs.py --dataset_dir DIR [--check]`.

Every `<dataset_dir>/refer_seg/<dataset>/*.p` (refclef, refcoco, refcoco+, refcocog, grefcoco,
refzom: `refs(unc).p`, `refs(umd).p`, `grefs(unc).p`, `Ref_ZOM.p`, ...) is read with the
plain-data reader (`utils.datasets.safe_pickle`: a file that would build any object is refused
and reported, never converted) and written as its JSON twin, the same name with `.json`, beside
it. The loaders then read the twin and never open the pickle.

An existing twin is never overwritten: it is compared with the pickle, and a disagreement is
reported (the loaders read the JSON; delete it to rewrite it from the pickle). Refs JSON cannot
hold exactly (tuples, non-string keys, sets, NaN) are reported, not written. `--check` writes
nothing and reports what it would write. Exit status 0 when every pickle has an equal twin
(written now or before), 1 otherwise (or when no refs pickle is found).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.datasets.base import DataError  # noqa: E402
from utils.datasets.refer import (  # noqa: E402
    PICKLE_SUFFIX,
    REFER_DATASETS,
    REFER_ROOT,
    json_twin,
    read_refs_pickle,
)
from utils.datasets.safe_pickle import UnsafePickleError  # noqa: E402

WROTE, AGREES, WOULD_WRITE = "wrote", "agrees", "would write"
DISAGREES, REFUSED, UNREADABLE, NOT_JSON = "DISAGREES", "REFUSED", "UNREADABLE", "NOT JSON"
GOOD = frozenset({WROTE, AGREES})


@dataclass(frozen=True)
class Outcome:
    """What happened to one refs pickle: `status` (one of the names above) and why."""

    pickle: Path
    status: str
    detail: str = ""

    @property
    def good(self) -> bool:
        return self.status in GOOD

    def line(self, dataset_dir: Path) -> str:
        name = self.pickle.relative_to(dataset_dir)
        return f"{self.status:<11} {name} -> {json_twin(self.pickle).name}" + (
            f": {self.detail}" if self.detail else ""
        )


def refs_pickles(dataset_dir: Path) -> list[Path]:
    """Every `*.p` in the referring datasets' folders under `<dataset_dir>/refer_seg/`."""
    root = dataset_dir / REFER_ROOT
    return sorted(
        path for name in REFER_DATASETS for path in (root / name).glob(f"*{PICKLE_SUFFIX}")
    )


def as_json(refs: object) -> str | None:
    """`refs` as JSON text, or None if JSON cannot hold them exactly (a tuple, a set, bytes, a
    non-string key, NaN): the text must read back equal."""
    try:
        text = json.dumps(refs, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return text if json.loads(text) == refs else None


def convert(pickle_file: Path, dataset_dir: Path, check: bool) -> Outcome:
    """Write (or, with `check`, only compare) the JSON twin of one refs pickle."""
    twin = json_twin(pickle_file)
    try:
        refs = read_refs_pickle(pickle_file, dataset_dir)
    except UnsafePickleError as error:
        return Outcome(pickle_file, REFUSED, str(error))
    except DataError as error:
        return Outcome(pickle_file, UNREADABLE, str(error))
    text = as_json(refs)
    if text is None:
        detail = "holds values JSON cannot keep as they are (tuples, sets, bytes, NaN, int keys)"
        return Outcome(pickle_file, NOT_JSON, detail)
    if twin.exists():
        return _compare(pickle_file, twin, refs)
    if check:
        return Outcome(pickle_file, WOULD_WRITE)
    partial = twin.with_name(twin.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, twin)  # a reader never sees half a file
    return Outcome(pickle_file, WROTE)


def _compare(pickle_file: Path, twin: Path, refs: object) -> Outcome:
    hint = "the loaders read the JSON; delete it and run this tool again to rewrite it"
    try:
        existing = json.loads(twin.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return Outcome(pickle_file, DISAGREES, f"the JSON cannot be read ({error}); {hint}")
    if existing != refs:
        return Outcome(pickle_file, DISAGREES, f"the JSON holds other refs than the pickle; {hint}")
    return Outcome(pickle_file, AGREES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default="./dataset", type=Path)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 unless every twin is equal"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pickles = refs_pickles(args.dataset_dir)
    if not pickles:
        print(f"no refs pickle under {args.dataset_dir / REFER_ROOT}/<dataset>/")
        return 1
    outcomes = [convert(path, args.dataset_dir, args.check) for path in pickles]
    for outcome in outcomes:
        print(outcome.line(args.dataset_dir))
    return 0 if all(outcome.good for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
