"""``rlft-ray make-tiny-model``: a tiny causal LM and character tokenizer, built offline."""

from __future__ import annotations

import argparse

from rlft_ray.config import ConfigError


def command(args: argparse.Namespace) -> int:
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.lm.tiny import make_tiny_model

    quiet_transformers()
    try:
        out = make_tiny_model(
            args.out,
            arch=args.arch,
            n_layer=args.layers,
            hidden=args.hidden,
            n_head=args.heads,
            max_positions=args.max_positions,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        raise ConfigError("make-tiny-model", str(exc)) from None
    print(
        f"wrote {args.arch} model + tokenizer to {out} (load with AutoModelForCausalLM.from_pretrained)"
    )
    return 0
