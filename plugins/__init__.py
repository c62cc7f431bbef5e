"""slimlab's built-in techniques, one per module, each loaded through the ``slimlab`` entry-point group."""
