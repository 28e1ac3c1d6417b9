"""Optimizers and learning-rate schedules: importing this package registers every module of it, so a
new optimizer or schedule is one new file."""
from utils.registry import import_submodules

import_submodules(__name__)
