"""sgsd command line."""
