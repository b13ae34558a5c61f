"""The `pdray` command-line app (installed as pdray.cli)."""
