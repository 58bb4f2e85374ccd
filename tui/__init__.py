"""taskwatch.tui: the dashboard app, its screens, the engine clients and the CLI."""
