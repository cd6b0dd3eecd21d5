"""a3mod's version: a leaf module (nothing to import), so every part can name it without importing the package."""
__version__ = "0.1.0"
