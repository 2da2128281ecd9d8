"""The package version, in its own module so every layer can read it without importing the top-level API."""

__version__ = "0.1.0"
# The name it is published under (pyproject's [project] name): "mmer" on PyPI is another project. The command
# and the import package keep the name `mmer`; install hints and the model card's link use this one.
DISTRIBUTION = "mmer-merge"
