"""The clinical inference service: the registry's champion (and challenger) behind an
authenticated HTTP API with shadow, canary and production modes and a kill switch."""
