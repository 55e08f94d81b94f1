"""The server's two stages, synthesis and training, and what only they use; each runs in-process or as its own command."""
