"""The package version, in a module of its own: code that needs it (the tokenization cache key) must not
import the package facade, which imports the API and, through it, training."""

__version__ = "0.1.0"
