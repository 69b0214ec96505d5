"""`makeway demo`: real work on this machine's Python standard library."""
