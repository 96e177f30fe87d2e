"""lora-rank-search: which LoRA rank, on which layers, measured by a Ray Tune search over 4-bit trials.

The packages live in the repository's top-level folders and are installed under this one name
(pyproject.toml's package-dir): `lora_rank_search.search` (the driver: config, Ray Tune, the
scheduler), `lora_rank_search.trainables` (what a trial runs), `lora_rank_search.analysis` (the
verdict, reports and plots, read from the experiment folder) and `lora_rank_search.contract` (the
leaf modules both halves agree on).
"""
