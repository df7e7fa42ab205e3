"""The pipeline file (schema, loader, diagnostics, checks against the model), the runner and
resume. Reaches stages only through the stage registry."""
