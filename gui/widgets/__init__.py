"""Reusable widgets that views build on (no view imports another view; they share these)."""
