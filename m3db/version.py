"""The m3db version, in one place (packages record it in their build info). Imports nothing."""

__version__ = "0.1.0"
