"""``python -m kdjax COMMAND ...``: the ``kdjax`` console script without its installed wrapper."""

from kdjax.cli import console_main

console_main()
