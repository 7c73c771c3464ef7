"""The dropout reproducibility harness. `from study import analyze_frame` analyses a table of
anyone's runs (README "Your own runs"); it is imported on first use, so `import study` stays
light (the CLI answers --help without pandas or scipy)."""

from __future__ import annotations

from typing import Any

__all__ = ["analyze_frame"]


def __getattr__(name: str) -> Any:
    if name == "analyze_frame":
        from study.analysis.frame import analyze_frame

        return analyze_frame
    raise AttributeError(f"module 'study' has no attribute {name!r}")
