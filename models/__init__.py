"""The model zoo: importing this package registers every model and backbone.

Every module below this folder is imported (see ``utils.registry.import_submodules``),
so a new model is one new file with a ``@MODELS.register`` class.
"""
from utils.registry import import_submodules

import_submodules(__name__)
