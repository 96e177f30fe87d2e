"""Search: config schema and validation, the Tune param space, Tuner construction, the CLI."""
