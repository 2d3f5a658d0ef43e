"""Runnable examples of typedbrain; each folder is one recipe with its README."""
