"""``python -m rlft_ray`` is the ``rlft-ray`` command."""

from rlft_ray.cli import main

raise SystemExit(main())
