"""The contract between the search and the analysis: config schema, experiment layout, arm, metrics, recommendation (leaf modules)."""
