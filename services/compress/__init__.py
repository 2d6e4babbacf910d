"""The compress service."""
