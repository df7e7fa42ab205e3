"""The stages: one module per stage type, each turning its Config into calls to ``compress`` and
``formats`` and reporting metrics. ``registry.list_stages()`` imports them all (registering
them); importing this package alone imports none, so the registry stays cheap to reach."""
