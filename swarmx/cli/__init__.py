"""The `swarmx` command line (Typer + Rich): the only package that imports rich."""
