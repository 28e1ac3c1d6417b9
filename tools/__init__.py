"""Commands run as ``python -m tools.NAME``; each has ``main(argv) -> int``. Nothing imports them but tests."""
