"""Error types the user sees: each names the file or config key and the problem.

Entry points (`p2l.main`, `p2l.detect`, `data_prep.*`) catch these and print the message alone, so a
bad input never surfaces as a traceback from deep inside JAX or nibabel.
"""

from __future__ import annotations

from pathlib import Path


class P2LError(Exception):
    """Base class of errors caused by the user's input rather than by a bug."""


class DataError(P2LError, ValueError):
    """A data file is missing, unreadable or inconsistent. The message starts with the path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(P2LError, ValueError):
    """A configuration value is missing or invalid. The message names the key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"config.{key}: {problem}")
