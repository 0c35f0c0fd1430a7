"""robustify.jobs."""
