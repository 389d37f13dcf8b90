"""Reading one of our YAML files (a study spec, a trial config) safely: :func:`read_yaml`.

``yaml.safe_load`` alone builds no objects but still lets hostile input through as
exceptions other than ``YAMLError`` (a RecursionError on deep nesting, a ValueError on
``2001-02-30``) or as unbounded work (``/dev/zero``). Here at most ``MAX_SPEC_BYTES`` are
read, nesting stops at ``MAX_DEPTH``, and every problem is a ConfigError naming the file,
so the command exits 2 with one message. The values themselves are checked by
:func:`orchestrator.spec.limits.check_values`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dit.errors import ConfigError
from orchestrator.spec.limits import MAX_DEPTH, MAX_SPEC_BYTES


class _DepthLimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting past MAX_DEPTH while composing: PyYAML composes
    recursively, so a file of 10^5 '[' would otherwise end in a RecursionError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML document at ``path`` (``what`` it is names it in messages: 'study spec')."""
    source = str(path)
    text = _read_text(Path(path), what)
    try:
        return yaml.load(text, Loader=_DepthLimitedLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}".rstrip()) from None
    except (ValueError, OverflowError) as err:
        # The constructor's own checks on a scalar: 2001-02-30 as a date, an int of 5,000 digits.
        raise ConfigError(f"{source}: not valid YAML: a value cannot be read ({err})") from None


def _read_text(path: Path, what: str) -> str:
    """The file's text; at most MAX_SPEC_BYTES are read, so /dev/zero or a huge file is refused too."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{source}: cannot read {what}: {err.strerror or err}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_SPEC_BYTES // 2**20} MiB; a {what} is a few KB "
                          "(is this the right file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
