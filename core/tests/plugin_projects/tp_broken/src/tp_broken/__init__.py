"""Test plugins whose import fails."""
