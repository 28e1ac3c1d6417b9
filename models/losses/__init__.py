"""Segmentation losses, one family per module, registered in ``utils.registry.LOSSES``.

Every loss is called as ``loss(logits, target)`` with logits ``(N, C, H, W)``
and an int64 target ``(N, H, W)`` holding ``ignore_index`` for void; it returns
a scalar and never modifies ``target``. The framework injects ``ignore_index``,
``num_classes``, ``train_dataset`` and ``cache_dir`` into constructors that
declare them; the config does not set them.

Every module of this package is imported here, so a new loss is one new file.
"""
from utils.registry import import_submodules

import_submodules(__name__)
