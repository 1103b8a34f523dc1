"""Entry points that reproduce the study; each module's docstring holds its exact command."""
