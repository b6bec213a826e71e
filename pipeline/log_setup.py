"""Logging for every command: one format chosen by a setting, repeats rate-limited, one record per traceback.

`configure()` runs once at the CLI entry point (pipeline/cli.py) with `Settings.log_format` / `log_level`
(TRAINWATCH_LOG_FORMAT, TRAINWATCH_LOG_LEVEL):

- `text` — `time level logger: message` for people; level colours only when the stream is a terminal.
- `json` — one JSON object per line: `ts` (ISO 8601 UTC), `level`, `logger`, `msg`, and when present `thread`,
  `exc` (the whole traceback as one string), `suppressed` (see below).
- `logfmt` — `ts=... level=... logger=... msg="..."`, the same keys, values quoted and escaped on one line.

Terminal escape codes (colours from faust/mode/colorlog, or inside messages) are stripped unless the stream is a
terminal in `text` mode. A traceback stays inside its one record: in json/logfmt its newlines are escaped.
Uncaught exceptions in threads (an ingest thread dying) and in the main thread become one ERROR/CRITICAL record
with the traceback, instead of lines printed to stderr (which faust's stdout redirection turned into one WARNING
per token). librdkafka's own log lines come through the `librdkafka` logger (KafkaSettings.client_config).

Rate limit: records with the same (logger, level, message with digits masked) share a token bucket: `burst`
records pass at once, then one per `every_s` seconds; the next record that passes carries `suppressed=N`, the
number dropped since the previous one of its kind, and at exit one summary record counts what was never reported.
A 30 s broker outage used to print 5,582 lines; 46 "producer buffer full" warnings came in 35 s.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any

from schemas import serde

FORMATS = ("text", "json", "logfmt")
HANDLER_NAME = "trainwatch"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_DIGITS = re.compile(r"\d+")
_COLOURS = {logging.DEBUG: "\x1b[2m", logging.INFO: "", logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m",
            logging.CRITICAL: "\x1b[1;31m"}


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class RepeatLimiter(logging.Filter):
    """Token bucket per kind of record (logger, level, message with digits masked); see the module doc."""

    def __init__(self, burst: int = 5, every_s: float = 10.0, max_kinds: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.every_s, self.max_kinds, self.clock = burst, every_s, max_kinds, clock
        self._kinds: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()  # [tokens, last, dropped]
        self._lock = threading.Lock()
        self.total_suppressed = 0

    def _kind(self, record: logging.LogRecord) -> tuple[str, int, str]:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: key on the template
            text = str(record.msg)
        return record.name, record.levelno, _DIGITS.sub("#", text)[:200]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_trainwatch_summary", False):
            return True
        kind, now = self._kind(record), self.clock()
        with self._lock:
            st = self._kinds.get(kind)
            if st is None:
                st = self._kinds[kind] = [float(self.burst), now, 0.0]
                if len(self._kinds) > self.max_kinds:
                    _, old = self._kinds.popitem(last=False)
                    self.total_suppressed -= int(old[2])  # forgotten kinds are not summarised
            else:
                self._kinds.move_to_end(kind)
                st[0] = min(float(self.burst), st[0] + (now - st[1]) / self.every_s)
                st[1] = now
            if st[0] < 1.0:
                st[2] += 1
                self.total_suppressed += 1
                return False
            st[0] -= 1.0
            if st[2]:
                record.suppressed = int(st[2])
                self.total_suppressed -= int(st[2])
                st[2] = 0
        return True

    def unreported(self) -> int:
        """Records dropped whose count no later record carried."""
        return self.total_suppressed


def _when(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, Any]:
    out: dict[str, Any] = {"ts": _when(record), "level": record.levelname, "logger": record.name,
                           "msg": strip_ansi(record.getMessage())}
    if record.threadName and record.threadName != "MainThread":
        out["thread"] = record.threadName
    if record.exc_info:
        out["exc"] = strip_ansi(formatter.formatException(record.exc_info))
    elif record.exc_text:
        out["exc"] = strip_ansi(record.exc_text)
    if record.stack_info:
        out["stack"] = strip_ansi(record.stack_info)
    if getattr(record, "suppressed", 0):
        out["suppressed"] = record.suppressed
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return serde.dumps(_fields(record, self)).decode()


_BARE = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")


def _logfmt_value(v: Any) -> str:
    text = str(v)
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record, self).items())


class TextFormatter(logging.Formatter):
    def __init__(self, colour: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, "suppressed", 0):
            text += f" ({record.suppressed} similar suppressed)"
        if not self.colour:
            return strip_ansi(text)
        colour = _COLOURS.get(record.levelno, "")
        return f"{colour}{text}\x1b[0m" if colour else text


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def make_handler(fmt: str, stream: IO[str] | None = None, limiter: RepeatLimiter | None = None) -> logging.Handler:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: choose from {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter({"json": JsonFormatter(), "logfmt": LogfmtFormatter()}.get(fmt) or TextFormatter(_is_tty(out)))
    handler.addFilter(limiter or RepeatLimiter())
    return handler


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("trainwatch.thread").error("thread %s died: %s", name, args.exc_value,
                                                 exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _main_hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("trainwatch").critical("uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))


_state: dict[str, Any] = {}


def _summary() -> None:
    limiter: RepeatLimiter | None = _state.get("limiter")
    if limiter is not None and limiter.unreported():
        logging.getLogger("trainwatch").warning("%d repeated log record(s) were suppressed by the rate limit",
                                                limiter.unreported(), extra={"_trainwatch_summary": True})


def configure(fmt: str = "text", level: str | int = "WARNING", *, stream: IO[str] | None = None,
              burst: int = 5, every_s: float = 10.0) -> logging.Handler:
    """Install the one root handler (replacing any), the exception hooks and the exit summary. Idempotent."""
    limiter = RepeatLimiter(burst, every_s)
    handler = make_handler(fmt, stream, limiter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    threading.excepthook = _thread_hook
    sys.excepthook = _main_hook
    if "limiter" not in _state:
        atexit.register(_summary)
    _state["limiter"] = limiter
    return handler


def configure_from_settings() -> None:
    """The CLI entry point's call: format and level from Settings; if the settings cannot be read, the plain
    default (the command itself then reports the settings error in one line)."""
    try:
        from pipeline.settings import load_settings

        s = load_settings()
        configure(s.log_format, s.log_level)
    except Exception:
        configure()
