"""The dataset doctor: for each requested source, whether its files are where the loaders look,
how many records it holds, and every unreadable or inconsistent record, with file and record.

`tools/check_dataset.py` prints the report; training start runs the same checks (not deep) on
the sources it uses and stops with the same messages instead of failing hours later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.mixer import family_factory

MAX_LISTED_PROBLEMS = 20


@dataclass
class SourceReport:
    """The doctor's finding for one source: `fatal` when it cannot be opened at all."""

    name: str
    records: int = 0
    problems: list[DataError] = field(default_factory=list)
    fatal: Exception | None = None

    @property
    def usable(self) -> bool:
        return self.fatal is None and self.records > 0 and not self.problems


def examine(name: str, open_source: Callable[[], Iterable], deep: bool) -> list[SourceReport]:
    """Open the source(s) `open_source` returns and check every record of each."""
    try:
        sources = list(open_source())
    except (DataError, ValueError, OSError) as error:
        return [SourceReport(name=name, fatal=error)]
    reports = []
    for source in sources:
        report = SourceReport(name=getattr(source, "name", name), records=len(source))
        report.problems.extend(source.check(deep=deep))
        if report.records == 0:
            report.fatal = DataError(name, None, "holds no records")
        reports.append(report)
    return reports


def examine_training(
    dataset_dir: Path,
    family_data: dict[str, list[str]],
    options: SamplingOptions,
    deep: bool = False,
) -> list[SourceReport]:
    """Reports for every sub-dataset of every requested family, each opened on its own so one
    broken sub-dataset does not hide the others."""
    reports = []
    for family, names in family_data.items():
        try:
            factory = family_factory(family)
        except ValueError as error:
            reports.append(SourceReport(name=family, fatal=error))
            continue
        if not names:
            reports.append(SourceReport(name=family, fatal=ValueError("no sub-dataset named")))
        for name in names:
            reports += examine(
                f"{family}/{name}", lambda f=factory, n=name: f(dataset_dir, [n], options), deep
            )
    return reports


def examine_validation(
    dataset_dir: Path, val_dataset: str, val_json_name: str, deep: bool = False
) -> list[SourceReport]:
    """Reports for every `--val_dataset` entry ("||"-joined)."""
    from utils.datasets.validation import build_validation_set, parse_val_datasets

    reports = []
    for entry in parse_val_datasets(val_dataset):
        reports += examine(
            str(entry), lambda e=entry: [build_validation_set(dataset_dir, e, val_json_name)], deep
        )
    return reports


def format_report(reports: list[SourceReport], max_listed: int = MAX_LISTED_PROBLEMS) -> str:
    """A human-readable report: one status line per source, then its problems."""
    lines = []
    for report in reports:
        if report.fatal is not None:
            lines.append(f"[UNUSABLE] {report.name}: {report.fatal}")
            continue
        status = "OK" if report.usable else "BAD"
        lines.append(
            f"[{status}] {report.name}: {report.records} records, {len(report.problems)} bad"
        )
        lines += [f"    {problem}" for problem in report.problems[:max_listed]]
        if len(report.problems) > max_listed:
            lines.append(f"    ... and {len(report.problems) - max_listed} more")
    return "\n".join(lines)


def raise_if_unusable(reports: list[SourceReport]) -> None:
    """Stop (training start) with the doctor's messages when any source is not clean."""
    bad = [report for report in reports if not report.usable]
    if bad:
        raise DataError(
            "dataset check",
            None,
            "some requested data is missing or broken:\n" + format_report(bad),
            "run tools/check_dataset.py for the full report",
        )
