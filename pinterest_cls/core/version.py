"""The package's version (also the wheel's: ``pyproject.toml`` reads it from here)."""

__version__ = "0.1.0"
