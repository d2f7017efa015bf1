"""relay: a self-hostable, end-to-end encrypted messaging relay on trio."""

__version__ = "0.1.0"
