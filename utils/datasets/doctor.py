"""The dataset doctor: for each requested source, whether its files are where the loaders look,
how many records it holds, and every unreadable or inconsistent record, with file and record.

Findings are errors (the loaders would raise on the record; the source is not usable) or
warnings (`DataError.fatal` False: the loaders work around them, e.g. a degenerate polygon part
left out of its mask); warnings are listed but do not make a source unusable.

`tools/check_dataset.py` prints the report; training start runs the same checks (not deep) on
the sources it uses and stops with the same messages instead of failing hours later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from utils.datasets.base import DataError, SamplingOptions
from utils.datasets.mixer import DataConfig, family_factory

MAX_LISTED_PROBLEMS = 20


@dataclass
class SourceReport:
    """The doctor's finding for one source: `failure` when it cannot be opened at all, else its
    record count, its `errors` (fatal findings: the loaders would raise on those records) and
    its `warnings` (non-fatal findings the loaders work around, e.g. dropped polygon parts)."""

    name: str
    records: int = 0
    errors: list[DataError] = field(default_factory=list)
    warnings: list[DataError] = field(default_factory=list)
    failure: Exception | None = None

    @property
    def usable(self) -> bool:
        """Opened, not empty and without errors; warnings do not count."""
        return self.failure is None and self.records > 0 and not self.errors

    def add(self, findings: Iterable[DataError]) -> None:
        """File each finding of a source's `check` as an error or a warning."""
        for finding in findings:
            (self.errors if finding.fatal else self.warnings).append(finding)


def examine(name: str, open_source: Callable[[], Iterable], deep: bool) -> list[SourceReport]:
    """Open the source(s) `open_source` returns and check every record of each."""
    try:
        sources = list(open_source())
    except (DataError, ValueError, OSError) as error:
        return [SourceReport(name=name, failure=error)]
    reports = []
    for source in sources:
        report = SourceReport(name=getattr(source, "name", name), records=len(source))
        report.add(source.check(deep=deep))
        if report.records == 0:
            report.failure = DataError(name, None, "holds no records")
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
            reports.append(SourceReport(name=family, failure=error))
            continue
        if not names:
            reports.append(SourceReport(name=family, failure=ValueError("no sub-dataset named")))
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

    try:
        entries = parse_val_datasets(val_dataset)
    except ValueError as error:
        return [SourceReport(name=f"--val_dataset {val_dataset}", failure=error)]
    reports = []
    for entry in entries:
        reports += examine(
            str(entry), lambda e=entry: [build_validation_set(dataset_dir, e, val_json_name)], deep
        )
    return reports


def format_report(reports: list[SourceReport], max_listed: int = MAX_LISTED_PROBLEMS) -> str:
    """A human-readable report: one status line per source with its error and warning counts,
    then up to `max_listed` of its errors and of its warnings, each marked as such."""
    lines = []
    for report in reports:
        if report.failure is not None:
            lines.append(f"[UNUSABLE] {report.name}: {report.failure}")
            continue
        status = "OK" if report.usable else "BAD"
        lines.append(
            f"[{status}] {report.name}: {report.records} records, {len(report.errors)} errors, "
            f"{len(report.warnings)} warnings"
        )
        lines += _listed(report.errors, "error", max_listed)
        lines += _listed(report.warnings, "warning", max_listed)
    return "\n".join(lines)


def _listed(findings: list[DataError], kind: str, max_listed: int) -> list[str]:
    """Indented "kind: finding" lines for the first `max_listed` findings, then how many more."""
    lines = [f"    {kind}: {finding}" for finding in findings[:max_listed]]
    if len(findings) > max_listed:
        lines.append(f"    ... and {len(findings) - max_listed} more {kind}s")
    return lines


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
    """Training start: the doctor's cheap checks (no image decoding) on every source of the mix;
    raises DataError with the doctor's messages when one is unusable, returns the reports."""
    family_data = {family: list(config.family_data.get(family, ())) for family in config.dataset}
    reports = examine_training(Path(config.dataset_dir), family_data, config.options, deep=False)
    raise_if_unusable(reports)
    return reports
