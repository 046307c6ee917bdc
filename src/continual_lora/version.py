"""The package version, in a module of its own so that any layer can read it without importing the
package root (whose ``__init__`` imports the adapter core and the methods)."""

__version__ = "0.2.0"  # pyproject.toml reads it from here
