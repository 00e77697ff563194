"""Placeholder: arrives with the rewards issue."""
