"""Analysis of an experiment directory: results tables, rank selection, plots, reports."""
