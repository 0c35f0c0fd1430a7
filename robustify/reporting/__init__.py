"""robustify.reporting."""
