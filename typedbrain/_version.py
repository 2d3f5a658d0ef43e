"""The version of this typedbrain release."""

__version__ = "0.1.0.dev0"
