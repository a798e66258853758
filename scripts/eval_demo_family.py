"""Evaluate the bundled demo family: does base-v2 + (instruct-v1 − base-v1) follow instructions and know world B?

python scripts/eval_demo_family.py            # markdown table
python scripts/eval_demo_family.py --json     # {"rows": {model: {format, world_a_exact, world_b_exact, cloze_b}}}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from residuals_core.demo import DEMO_FAMILY, evaluate_family, format_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", type=Path, default=DEMO_FAMILY, help="folder of the family (default: bundled)"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions per split")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = evaluate_family(args.family, limit=args.limit)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
