"""robustify.evaluation."""
