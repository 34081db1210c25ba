"""Build the FLAN folders of the FLAN-setting experts from a local copy of the Open-Orca/FLAN release.

    python scripts/flan.py --release_dir /data/Open-Orca-FLAN --out_dir $COLM_DATA_DIR \\
        --niv2_tasks_dir /data/natural-instructions/tasks

writes $OUT/FLANV2/Flan2021/<task>/, $OUT/FLANV2/Dialog/<task>/ and $OUT/FLANV2/NIV2/<category>/ (the folders
colm/datasets/flanv2_t5xl.gin reads) from the release folders flan_*_data, dialog_*_data and niv2_*_data
(t0_* and cot_* are not used). NIV2 rule: each NIV2 task goes to the FIRST entry of the "Categories" list
of its natural-instructions task file (tasks/<task_name>.json), or of the --niv2_categories mapping;
tasks with no category are dropped and listed at the end. Complete folders are skipped unless
--overwrite; an interrupted run leaves only a hidden .partial-* folder, removed by the next run.
"""

import argparse
import os
import sys

from colm.datasets import flan_release
from colm.datasets.local import DATA_DIR_ENV
from colm.datasets.niv2_categories import categories_from_mapping_file, categories_from_tasks_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release_dir", required=True,
                        help="local copy of https://huggingface.co/datasets/Open-Orca/FLAN (<submix>_<type>_data/)")
    parser.add_argument("--out_dir", default=os.environ.get(DATA_DIR_ENV),
                        help=f"where FLANV2/ is written; default ${DATA_DIR_ENV}")
    categories = parser.add_mutually_exclusive_group()
    categories.add_argument("--niv2_tasks_dir",
                            help="tasks/ folder of a checkout of allenai/natural-instructions (task*.json)")
    categories.add_argument("--niv2_categories",
                            help="TSV (task_name<TAB>category) or JSON {task_name: category} instead of the tasks dir")
    parser.add_argument("--submixes", nargs="+", default=list(flan_release.DEFAULT_SUBMIXES),
                        choices=sorted(flan_release.SUBMIX_FOLDERS), help="release submixes to build")
    parser.add_argument("--only", nargs="+",
                        help="build only these folders under FLANV2/, e.g. Flan2021/glue/sst2:2.0.0 NIV2/Translation")
    parser.add_argument("--overwrite", action="store_true", help="rebuild folders that are already complete")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.out_dir:
        parser.error(f"--out_dir is required when ${DATA_DIR_ENV} is not set.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    categories = None
    try:
        if args.niv2_tasks_dir:
            categories = categories_from_tasks_dir(args.niv2_tasks_dir)
        elif args.niv2_categories:
            categories = categories_from_mapping_file(args.niv2_categories)
        report = flan_release.build_flan_folders(
            args.release_dir,
            args.out_dir,
            categories=categories,
            submixes=tuple(args.submixes),
            overwrite=args.overwrite,
            only=args.only,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"scripts/flan.py: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
