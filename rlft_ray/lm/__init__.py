"""Language-model helpers: tiny offline tokenizers/models, prompt data, policies, SFT, evaluation."""

from __future__ import annotations


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings (errors still show)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
