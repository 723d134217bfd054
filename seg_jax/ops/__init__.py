"""Device operations with more than one implementation (see conv.py)."""
