"""The `mmer` command line: a thin Typer layer over the mmer library (installed as `mmer_cli`)."""
