"""The HTTP side of makeway: Prometheus metrics and a JSON API over a store."""
