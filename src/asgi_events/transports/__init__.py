"""Transports: each feeds the node's streams (``streams.py``) from one kind of connection."""
