"""The node: a supervisor process and the worker processes it controls."""
