"""TensorBoard event files of every metrics row (``tracking.tensorboard``)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml

from rlft_ray.config import flat_dict

logger = logging.getLogger(__name__)


TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Every metrics row as TensorBoard scalars against ``counters/iteration``, and the
    config as text, in ``tensorboard/`` of the run directory (tensorboardX's protocol
    buffers and event-file writer, which Ray Tune brings along). Events are written and
    flushed with each report, synchronously: nothing waits in a queue when the run
    ends. An attempt's file starts with a purge marker at its first iteration, so
    TensorBoard drops what an earlier attempt logged for the iterations that run again.
    A tracker never fails a run: an error is reported once and logging stops.
    """

    def __init__(self, output_dir: Path, config_text: str, score_metric: str = "") -> None:
        self.directory = Path(output_dir) / TENSORBOARD_DIR
        self.config_text = config_text
        self.score_metric = score_metric
        self.writer: Any = None
        self.failed = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Log ``rows`` (one per iteration) and flush."""
        if self.failed or not rows:
            return
        try:
            from tensorboardX import summary
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            if self.writer is None:
                first = int(rows[0].get("counters/iteration", 1))
                self.directory.mkdir(parents=True, exist_ok=True)
                self.writer = EventsWriter(str(self.directory / "events"))
                self.writer.write_event(
                    Event(step=first, session_log=SessionLog(status=SessionLog.START))
                )
                text = summary.text("config", f"```yaml\n{self.config_text}\n```")
                self.writer.write_event(Event(step=first, wall_time=time.time(), summary=text))
                for part in self._hparams(summary):  # HParams tab: the config, the score
                    self.writer.write_event(Event(step=first, wall_time=time.time(), summary=part))
            for row in rows:
                step = int(row.get("counters/iteration", 0))
                for key, value in row.items():
                    number = isinstance(value, (int, float)) and not isinstance(value, bool)
                    if number and math.isfinite(value):
                        event = Event(step=step, wall_time=time.time())
                        event.summary.CopyFrom(summary.scalar(key, float(value)))
                        self.writer.write_event(event)
            self.writer.flush()
        except Exception as exc:  # disk full, no tensorboardX: the run goes on
            self.failed = True
            logger.warning("TensorBoard logging stopped: %s: %s", type(exc).__name__, exc)

    def _hparams(self, summary: Any) -> tuple[Any, ...]:
        """The config's fields (dotted keys; lists as text) for TensorBoard's HParams tab,
        with the run's score metric as its metric column."""
        values = flat_dict(yaml.safe_load(self.config_text) or {})
        params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()
        }
        exp, ssi, _ = summary.hparams(params, {self.score_metric: None})
        return exp, ssi
