"""Metrics, events and tracing."""
