"""Data sets and joint transforms; importing this package registers them."""
from dataloader import camvid, synthetic, transforms  # noqa: F401
