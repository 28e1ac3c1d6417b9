"""Learning-rate schedules, registered in ``utils.registry.SCHEDULERS``, stepped every iteration.

Every module of this package is imported here, so a new schedule is one new file.
"""
from utils.registry import import_submodules

import_submodules(__name__)
