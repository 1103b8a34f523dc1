"""The named recipes kdjax ships: TOML files of a command's flags (``kdjax.cli.recipe``'s format),
each saying where its values come from. ``kdjax recipes`` lists them; ``--recipe NAME`` reads one
(flags on the command line still win)."""
