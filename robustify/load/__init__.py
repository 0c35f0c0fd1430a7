"""robustify.load."""
