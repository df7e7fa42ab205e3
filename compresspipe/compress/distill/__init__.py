"""Knowledge distillation without the pipeline: ``config`` (DistillConfig), ``losses`` (the KD
and feature terms, feature probing), ``hook`` (DistillHook for the training loop, agreement) and
``teacher`` (how a teacher string is read; timm, checkpoint and artifact teachers). Stage and
MLflow teachers are resolved in ``compresspipe.stages.teacher``."""
