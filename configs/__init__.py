"""YAML run presets, shipped in the package as pdray.configs (`--config NAME`)."""
