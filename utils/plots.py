"""The one matplotlib setup: files only, no display (the Agg backend)."""
from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend; imported on first use (matplotlib is slow to import)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt
