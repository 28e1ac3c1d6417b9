"""Data sets and joint transforms: importing this package registers all of them.

Every module below this folder is imported, so a new data set or transform is
one new file with a ``@DATASETS.register`` / ``@TRANSFORMS.register`` class.
"""
from utils.registry import import_submodules

import_submodules(__name__)
