"""Optimizers selectable from config (``optimizer.type``), registered in ``utils.registry.OPTIMIZERS``.

Every module of this package is imported here, so a new optimizer is one new file.
"""
from utils.registry import import_submodules

import_submodules(__name__)
