"""Knowledge distillation: the losses, the training hook and where a teacher comes from."""
