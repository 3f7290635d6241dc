"""The dataset doctor: for each source a run reads (or, `discover_checks`, every source found
under a dataset directory), whether its files are where the loaders look, how many records it
holds, and every unreadable or inconsistent record, with file and record.

Findings are errors (the loaders would raise on the record; the source is not usable) or
warnings (`DataError.fatal` False: the loaders work around them, e.g. a degenerate polygon part
left out of its mask); warnings are listed but do not make a source unusable.

The unit of work is a `Check`: a small picklable description of one training sub-dataset, one
validation set, or every split of one referring refs file. `run_checks` runs them in worker
processes (the checks are mostly Python: json walking, polygon and RLE parsing, and PIL's PNG
decoding, which hold the GIL, so threads do not run them in parallel; measured: two threads
took as long as one, two processes half the time) and returns the reports in the order asked,
whatever the number of workers. `deep` decodes every image and mask; without it (`--quick`)
only existence and annotations are checked.

`tools/check_dataset.py` prints the report; training start runs the quick checks on the
sources it uses (`check_training_data`) and stops with the same messages instead of failing
hours later.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.mixer import DEFAULT_FAMILY_DATA, DataConfig, family_factory
from utils.datasets.mmr import MMR_DIR, MMR_TRAIN_JSON
from utils.datasets.parts import PART_SPECS
from utils.datasets.reason_seg import EXPLANATORY_JSON, REASON_SEG_DIR, parse_spec
from utils.datasets.refer import (
    REFER_DATASETS,
    REFER_ROOT,
    ReferIndex,
    open_refer_index,
    refs_file_candidates,
)
from utils.datasets.sem_seg import LABEL_MAP_SPECS
from utils.datasets.semantic_val import (
    SEMANTIC_VAL_SETS,
    SEMANTIC_VAL_SPLIT,
    SemanticValidation,
    label_folder,
    parse_semantic_val,
)
from utils.datasets.validation import (
    REFCOCOM_DIR,
    REFER_SPLIT_BYS,
    TWO_FIELD_SPLITS,
    ValEntry,
    build_validation_set,
    parse_val_datasets,
)
from utils.datasets.vqa import VQA_DIR

MAX_LISTED_PROBLEMS = 20
# fresh worker processes: the parent holds torch's and OpenCV's threads, which a fork copies
# in whatever state they are in
START_METHOD = "spawn"
DECODED_NOTE = "decoded"
QUICK_NOTE = "quick (not decoded)"
# the --val_dataset names of the sets read from a file chosen by --val_json_name
MMR_ENTRY, REFCOCOM_ENTRY = "MultiPartReasonSeg", "RefCOCOm"


class Checkable(Protocol):
    """What the doctor examines: a training source or a validation set."""

    def __len__(self) -> int: ...

    def check(self, deep: bool = False) -> Iterator[DataError]: ...


class Check(Protocol):
    """One unit of the doctor's work (picklable, opened in a worker): `name` for the report,
    `open` returns the source(s) to examine (DataError, ValueError or OSError if it cannot)."""

    @property
    def name(self) -> str: ...

    def open(self) -> list[Checkable]: ...


@dataclass
class SourceReport:
    """The doctor's finding for one source: `failure` when it cannot be opened at all, else its
    record count, its `errors` (fatal findings: the loaders would raise on those records) and
    its `warnings` (non-fatal findings the loaders work around, e.g. dropped polygon parts).
    `decoded`: whether its images and masks were decoded (deep) or only looked for."""

    name: str
    records: int = 0
    errors: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)
    failure: Exception | None = None
    decoded: bool = False

    @property
    def usable(self) -> bool:
        """Opened, not empty and without errors; warnings do not count."""
        return self.failure is None and self.records > 0 and not self.errors

    def add(self, findings: Iterable[DataError]) -> None:
        """File each finding of a source's `check` as an error or a warning."""
        for finding in findings:
            (self.errors if finding.fatal else self.warnings).append(finding)


# --- the units of work ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingCheck:
    """One training sub-dataset: a `--dataset` family and one of its `--<family>_data` names."""

    dataset_dir: Path
    family: str
    dataset: str
    options: SamplingOptions

    @property
    def name(self) -> str:
        return f"{self.family}/{self.dataset}"

    def open(self) -> list[Checkable]:
        return list(family_factory(self.family)(self.dataset_dir, [self.dataset], self.options))


@dataclass(frozen=True)
class ValidationCheck:
    """One `--val_dataset` entry with its `--val_json_name`."""

    dataset_dir: Path
    entry: ValEntry
    json_name: str = ""

    @property
    def name(self) -> str:
        return str(self.entry)

    def open(self) -> list[Checkable]:
        return [build_validation_set(self.dataset_dir, self.entry, self.json_name)]


@dataclass(frozen=True)
class SemanticValCheck:
    """One semantic-segmentation validation set ("ade20k|val", ...: `utils.datasets.semantic_val`):
    its class list file read and counted, every label map beside its image (deep: decoded, the
    same size as the image, every value a class's or an ignored one)."""

    dataset_dir: Path
    dataset: str

    @property
    def name(self) -> str:
        return f"{self.dataset}|{SEMANTIC_VAL_SPLIT}"

    def open(self) -> list[Checkable]:
        return [SemanticValidation(self.dataset_dir, self.dataset)]


@dataclass(frozen=True)
class ReferSplitsCheck:
    """Every split of one referring refs file (`refer_seg/<dataset>/` with `split_by`), each
    reported on its own: the file is read once for all of them."""

    dataset_dir: Path
    dataset: str
    split_by: str

    @property
    def name(self) -> str:
        return f"{self.dataset}|{self.split_by}"

    def open(self) -> list[Checkable]:
        index = open_refer_index(self.dataset_dir, self.dataset, self.split_by)
        reported: set[int] = set()
        return [
            ReferSplit(index, f"{self.name}|{split}", split, reported) for split in index.splits()
        ]


class ReferSplit:
    """One split of an opened referring index (records: its images). Findings the index shares
    between splits (instances.json entries it could not read, refs without a readable split)
    are reported once, with the first split that meets them (`reported`: their ids)."""

    def __init__(self, index: ReferIndex, name: str, split: str, reported: set[int]) -> None:
        self.index, self.name, self.split, self.reported = index, name, split, reported

    def __len__(self) -> int:
        return len(self.index.refs_by_image(self.split))

    def check(self, deep: bool = False) -> Iterator[DataError]:
        for finding in self.index.check(self.split, deep):
            if id(finding) not in self.reported:
                self.reported.add(id(finding))
                yield finding


@dataclass(frozen=True)
class Unopenable:
    """A requested source known to be unusable before opening it (e.g. an unknown family)."""

    name: str
    error: Exception

    def open(self) -> list[Checkable]:
        raise self.error


# --- examining ----------------------------------------------------------------------------------
def examine(check: Check, deep: bool) -> list[SourceReport]:
    """Open the source(s) of `check` and check every record of each."""
    try:
        sources = check.open()
    except (DataError, ValueError, OSError) as error:
        return [SourceReport(name=check.name, failure=error, decoded=deep)]
    if not sources:
        empty = DataError(check.name, None, "holds no records")
        return [SourceReport(name=check.name, failure=empty, decoded=deep)]
    reports = []
    for source in sources:
        name = getattr(source, "name", check.name)
        report = SourceReport(name=name, records=len(source), decoded=deep)
        report.add(source.check(deep=deep))
        if report.records == 0:
            report.failure = DataError(name, None, "holds no records")
        reports.append(report)
    return reports


def run_check(check: Check, deep: bool) -> list[SourceReport]:
    """`examine` in a worker: an exception other than the findings' is a bug in the check;
    it is reported as that source's failure, with where it was raised, so the other sources
    are still reported."""
    try:
        return examine(check, deep)
    except Exception as error:  # reported with the source, not swallowed
        where = traceback.extract_tb(error.__traceback__)[-1]
        problem = (
            f"its check stopped on {type(error).__name__}: {error} "
            f"({Path(where.filename).name}:{where.lineno}; a bug in the check, please report it)"
        )
        return [SourceReport(name=check.name, failure=RuntimeError(problem), decoded=deep)]


def default_workers() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_checks(checks: Sequence[Check], deep: bool, workers: int = 1) -> list[SourceReport]:
    """The reports of every check, in the order of `checks` whatever `workers` (processes; 1:
    in this process), with a progress bar on a terminal."""
    results: list[list[SourceReport]] = [[] for _ in checks]
    with tqdm(total=len(checks), desc="dataset doctor", unit="source", disable=None) as bar:
        if workers <= 1 or len(checks) <= 1:
            for position, check in enumerate(checks):
                results[position] = run_check(check, deep)
                bar.set_postfix_str(check.name)
                bar.update()
            return [report for group in results for report in group]
        context = get_context(START_METHOD)
        with ProcessPoolExecutor(min(workers, len(checks)), mp_context=context) as pool:
            pending = {pool.submit(run_check, check, deep): i for i, check in enumerate(checks)}
            for future in as_completed(pending):
                position = pending[future]
                results[position] = _result(future, checks[position], deep)
                bar.set_postfix_str(checks[position].name)
                bar.update()
    return [report for group in results for report in group]


def _result(future: Future, check: Check, deep: bool) -> list[SourceReport]:
    """A worker's reports; a worker that died (e.g. killed for memory) fails its check."""
    try:
        return future.result()
    except Exception as error:  # the process pool's own failures (BrokenProcessPool...)
        problem = f"its worker process failed ({type(error).__name__}: {error})"
        return [SourceReport(name=check.name, failure=RuntimeError(problem), decoded=deep)]


# --- what to check -------------------------------------------------------------------------------
def training_checks(
    dataset_dir: Path, family_data: Mapping[str, Sequence[str]], options: SamplingOptions
) -> list[Check]:
    """A check per sub-dataset of every requested family, each opened on its own so one broken
    sub-dataset does not hide the others."""
    checks: list[Check] = []
    for family, names in family_data.items():
        try:
            family_factory(family)
        except ValueError as error:
            checks.append(Unopenable(family, error))
            continue
        if not names:
            checks.append(Unopenable(family, ValueError("no sub-dataset named")))
        checks += [TrainingCheck(Path(dataset_dir), family, name, options) for name in names]
    return checks


def validation_checks(dataset_dir: Path, val_dataset: str, val_json_name: str) -> list[Check]:
    """A check per `--val_dataset` entry ("||"-joined); the semantic-segmentation sets
    ("ade20k|val", ...) first, in their order, then the others."""
    entries = [entry for entry in val_dataset.split("||") if entry]
    semantic = [entry for entry in entries if _is_semantic_val(entry)]
    checks: list[Check] = [
        SemanticValCheck(Path(dataset_dir), parse_semantic_val(entry)) for entry in semantic
    ]
    if semantic:
        others = "||".join(entry for entry in entries if entry not in semantic)
        if not others:
            return checks
    else:
        others = val_dataset
    try:
        parsed = parse_val_datasets(others)
    except ValueError as error:
        return [*checks, Unopenable(f"--val_dataset {val_dataset}", error)]
    return checks + [ValidationCheck(Path(dataset_dir), entry, val_json_name) for entry in parsed]


def _is_semantic_val(entry: str) -> bool:
    try:
        parse_semantic_val(entry)
    except ValueError:
        return False
    return True


def examine_training(
    dataset_dir: Path,
    family_data: Mapping[str, Sequence[str]],
    options: SamplingOptions,
    deep: bool = False,
) -> list[SourceReport]:
    """Reports for every sub-dataset of every requested family, in this process."""
    checks = training_checks(dataset_dir, family_data, options)
    return [report for check in checks for report in examine(check, deep)]


# --- every dataset under a directory (--all) -----------------------------------------------------
Found = list[tuple[str, list[Check]]]  # (folder under the dataset directory, its checks)


def discover_checks(dataset_dir: Path, options: SamplingOptions) -> tuple[list[Check], list[str]]:
    """(checks, absent): a check for every family, split and validation file found under
    `dataset_dir` (the layouts the loaders read), and the dataset folders that are not there.

    A dataset is there when its own folder is (`ade20k/`, `vlpart/paco/`, `refer_seg/refcoco/`,
    `MMR/`...); a folder that is there but incomplete is checked, so what it lacks is reported.
    """
    root = Path(dataset_dir)
    checks: list[Check] = []
    absent: list[str] = []
    for find in (_semantic, _referring, _vqa, _reason_seg, _mmr, _refcocom, _semantic_val):
        for folder, found in find(root, options):
            if (root / folder).is_dir():
                checks += found
            else:
                absent.append(folder)
    return checks, absent


def _semantic(root: Path, options: SamplingOptions) -> Found:
    """Label-map datasets by their label folder's top folder (COCO-Stuff shares its images),
    part datasets by the two top folders of their json (`vlpart/<name>`)."""
    folders = {name: Path(spec.labels).parts[0] for name, spec in LABEL_MAP_SPECS.items()}
    for name, spec in PART_SPECS.items():
        folders[name] = Path(*Path(spec.annotations).parts[:2]).as_posix()
    return [
        (folder, [TrainingCheck(root, "sem_seg", name, options)])
        for name, folder in folders.items()
    ]


def _referring(root: Path, options: SamplingOptions) -> Found:
    """Every refs file of every referring dataset (all splits, training's included); a folder
    without any reports the default refs file as missing."""
    found: Found = []
    for dataset, (default_split_by, _) in REFER_DATASETS.items():
        folder = f"{REFER_ROOT}/{dataset}"
        split_bys = [
            split_by
            for split_by in REFER_SPLIT_BYS.get(dataset, (default_split_by,))
            if any((root / folder / n).is_file() for n in refs_file_candidates(dataset, split_by))
        ]
        checks = [ReferSplitsCheck(root, dataset, by) for by in split_bys or [default_split_by]]
        found.append((folder, checks))
    return found


def _vqa(root: Path, options: SamplingOptions) -> Found:
    names = [path.stem for path in sorted((root / VQA_DIR).glob("*.json"))]
    checks = [TrainingCheck(root, "vqa", name, options) for name in names]
    return [(VQA_DIR, checks or [_no_files(root / VQA_DIR, "*.json")])]


def _reason_seg(root: Path, options: SamplingOptions) -> Found:
    """The training split as training reads it (explanations included), every other split
    folder as a validation set."""
    spec = DEFAULT_FAMILY_DATA["reason_seg"]
    dataset, train = parse_spec(spec)
    folder = root / REASON_SEG_DIR / dataset
    explanations = Path(EXPLANATORY_JSON).parts[0]
    splits = sorted(p.name for p in folder.glob("*") if p.is_dir() and p.name != explanations)
    checks: list[Check] = [
        TrainingCheck(root, "reason_seg", spec, options)
        if split == train
        else ValidationCheck(root, ValEntry(dataset, "", split))
        for split in splits
    ]
    return [(f"{REASON_SEG_DIR}/{dataset}", checks or [_no_files(folder, "split folders")])]


def _mmr(root: Path, options: SamplingOptions) -> Found:
    """MMR_train.json as training reads it, every other json as a validation file."""
    checks: list[Check] = [
        TrainingCheck(root, "multi_part_reason_seg", path.name, options)
        if path.name == MMR_TRAIN_JSON
        else _validation_file(root, MMR_ENTRY, path)
        for path in sorted((root / MMR_DIR).glob("*.json"))
    ]
    return [(MMR_DIR, checks or [_no_files(root / MMR_DIR, "*.json")])]


def _refcocom(root: Path, options: SamplingOptions) -> Found:
    annotations = root / REFCOCOM_DIR / "annotations"
    paths = sorted(annotations.glob("*.json"))
    checks = [_validation_file(root, REFCOCOM_ENTRY, path) for path in paths]
    return [(REFCOCOM_DIR, checks or [_no_files(annotations, "*.json")])]


def _semantic_val(root: Path, options: SamplingOptions) -> Found:
    """LaSagnA's four validation sets, each by its label-map folder (the set's top folder is
    shared with training data or other sets)."""
    return [
        (label_folder(root, dataset), [SemanticValCheck(root, dataset)])
        for dataset in SEMANTIC_VAL_SETS
    ]


def _validation_file(root: Path, dataset: str, path: Path) -> Check:
    """The validation set of an annotation file chosen by `--val_json_name`."""
    split = split_named_in(path, TWO_FIELD_SPLITS[dataset] or ("val",))
    return ValidationCheck(root, ValEntry(dataset, "", split), path.name)


def split_named_in(path: Path, splits: Sequence[str]) -> str:
    """The longest of `splits` that the file's name contains ("MMR_test_mixed.json" -> "test",
    "refcocom_testA.json" -> "testA"), else the first; it only names the report."""
    named = [split for split in splits if split in path.stem]
    return max(named, key=len) if named else splits[0]


def _no_files(folder: Path, expected: str) -> Check:
    return Unopenable(str(folder), DataError(folder, None, f"holds no {expected}"))


# --- the report ---------------------------------------------------------------------------------
def format_report(reports: list[SourceReport], max_listed: int = MAX_LISTED_PROBLEMS) -> str:
    """A human-readable report: one status line per source with its record, error and warning
    counts and whether it was decoded, then up to `max_listed` (0: all) of its errors and of
    its warnings, each marked as such."""
    lines = []
    for report in reports:
        if report.failure is not None:
            lines.append(f"[UNUSABLE] {report.name}: {report.failure}")
            continue
        status = "OK" if report.usable else "BAD"
        lines.append(
            f"[{status}] {report.name}: {report.records} records, {len(report.errors)} errors, "
            f"{len(report.warnings)} warnings; {DECODED_NOTE if report.decoded else QUICK_NOTE}"
        )
        lines += _listed(report.errors, "error", max_listed)
        lines += _listed(report.warnings, "warning", max_listed)
    return "\n".join(lines)


def _listed(findings: list[DataError], kind: str, max_listed: int) -> list[str]:
    """Indented "kind: finding" lines for the first `max_listed` findings (0: all), then how
    many more."""
    shown = findings[:max_listed] if max_listed else findings
    lines = [f"    {kind}: {finding}" for finding in shown]
    if len(findings) > len(shown):
        lines.append(f"    ... and {len(findings) - len(shown)} more {kind}s")
    return lines


def summary(reports: list[SourceReport]) -> str:
    """One closing line: sources by status, and the findings in all."""
    unusable = sum(report.failure is not None for report in reports)
    bad = sum(not report.usable for report in reports) - unusable
    errors = sum(len(report.errors) for report in reports)
    warnings = sum(len(report.warnings) for report in reports)
    return (
        f"{len(reports)} sources: {len(reports) - bad - unusable} OK, {bad} with errors, "
        f"{unusable} unusable; {errors} errors and {warnings} warnings in all"
    )


def raise_if_unusable(reports: list[SourceReport]) -> None:
    """Stop (training start) with the doctor's messages when any source is unusable (warnings
    alone do not stop it)."""
    bad = [report for report in reports if not report.usable]
    if bad:
        raise DataError(
            "dataset check",
            None,
            "some requested data is missing or broken:\n" + format_report(bad),
            "run tools/check_dataset.py for the full report",
        )


def check_training_data(config: DataConfig) -> list[SourceReport]:
    """Training start: the doctor's quick checks (no decoding) on every source of the mix, in
    this process; raises DataError with the doctor's messages when one is unusable, returns
    the reports."""
    family_data = {family: list(config.family_data.get(family, ())) for family in config.dataset}
    reports = examine_training(Path(config.dataset_dir), family_data, config.options, deep=False)
    raise_if_unusable(reports)
    return reports
