"""The dataset doctor: `python tools/check_dataset.py --dataset_dir DIR [--dataset ...]
[--sem_seg_data ...] [--val_dataset ...] [--deep]`.

Says, for each requested source, whether its files are where the loaders look, how many records
it holds, and every unreadable or inconsistent record with its file and record. Exits 1 when a
requested source is unusable or holds bad records (errors), 0 when it is clean or has only
warnings (e.g. a degenerate polygon part that is left out of its mask).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.datasets.base import SamplingOptions  # noqa: E402
from utils.datasets.doctor import (  # noqa: E402
    examine_training,
    examine_validation,
    format_report,
)
from utils.datasets.mixer import DEFAULT_FAMILY_DATA  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default="./dataset", type=Path)
    parser.add_argument("--dataset", default="sem_seg||refer_seg||vqa||multi_part_reason_seg")
    for family, default in DEFAULT_FAMILY_DATA.items():
        parser.add_argument(f"--{family}_data", default=default)
    parser.add_argument("--val_dataset", default="", help='e.g. "MultiPartReasonSeg|val"')
    parser.add_argument("--val_json_name", default="")
    parser.add_argument("--deep", action="store_true", help="also decode every image")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    families = [name for name in args.dataset.split("||") if name]
    family_data = {
        family: [n for n in getattr(args, f"{family}_data", "").split("||") if n]
        for family in families
    }
    reports = examine_training(args.dataset_dir, family_data, SamplingOptions(), deep=args.deep)
    if args.val_dataset:
        reports += examine_validation(
            args.dataset_dir, args.val_dataset, args.val_json_name, deep=args.deep
        )
    print(format_report(reports))
    return 0 if all(report.usable for report in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
