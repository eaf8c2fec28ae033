"""Where buffered events live and how they reach every node: ``memory`` (default) or ``redis``."""
