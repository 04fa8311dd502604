"""``rlft-ray tune``: run a search spec and print its table, best trial and the commands to use it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rlft_ray.config import ConfigError
from rlft_ray.tune.results import format_table
from rlft_ray.tune.search import run_search


def command(args: argparse.Namespace) -> int:
    if args.resume and args.output_dir is None:
        raise ConfigError("--resume", "needs --output-dir of the search to continue")
    output_dir = (
        args.output_dir or Path("runs") / f"tune-{args.spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    result = run_search(
        args.spec,
        output_dir,
        resume=args.resume,
        verbose=0 if args.quiet else 1,
        address=args.address,
    )
    print(format_table(result.rows, result.metric))
    print(f"\nsearch directory: {result.output_dir}  ({result.wall_s:.0f} s)")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    if result.best is None:
        print("error: no trial reported a finite metric; see the error column", file=sys.stderr)
        return 1
    print(f"best: trial {result.best['trial']} {result.metric}={result.best['value']:.4g}")
    print(f"  evaluate: rlft-ray eval {result.best['checkpoint']}")
    print(f"  retrain:  {result.best['train_command']}")
    return 0
