"""Development tools of the repository (not part of the typedbrain package)."""
