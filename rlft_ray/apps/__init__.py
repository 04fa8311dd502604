"""One module per CLI verb besides train and tune: each has a ``command(args) -> int``."""

from pathlib import Path

#: The shipped run configs (``examples/`` beside the package in a source checkout).
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
