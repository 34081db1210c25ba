"""Prints every evaluation recorded in a results.txt (or results_in_training.txt) as a table.

    python scripts/show_results.py exp_out/<exp_name>/results.txt
"""

import argparse

from colm.procedures.results import read_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    args = parser.parse_args()
    for i, (header, results) in enumerate(read_results(args.path)):
        datasets = {k: v for k, v in results.items() if isinstance(v, dict)}
        scores = ", ".join(f"{name}: {values['score']}" for name, values in datasets.items())
        print(f"{i}. {header} | average_score {results.get('average_score')} | {scores}")


if __name__ == "__main__":
    main()
