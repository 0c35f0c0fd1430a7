"""robustify.core."""
