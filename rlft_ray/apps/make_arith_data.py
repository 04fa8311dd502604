"""``rlft-ray make-arith-data``: the arithmetic prompt splits (train / held-out test)."""

from __future__ import annotations

import argparse

from rlft_ray.config import ConfigError


def command(args: argparse.Namespace) -> int:
    from envs.arithmetic import write_splits

    if args.train < 1 or args.test < 0:
        raise ConfigError("--train/--test", "need --train >= 1 and --test >= 0 problems")
    try:
        train, test = write_splits(
            args.out,
            args.train,
            args.test,
            kind=args.kind,
            seed=args.seed,
            max_operand=args.max_operand,
            chat=args.chat,
        )
    except ValueError as exc:
        raise ConfigError("make-arith-data", str(exc)) from None
    print(f"wrote {args.train} problems to {train} and {args.test} to {test}")
    return 0
