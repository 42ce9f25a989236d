"""Built-in recipes, one TOML file each (see ``qcompiler.config`` for the format)."""
