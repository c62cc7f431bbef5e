"""Knowledge distillation (work in progress: registers nothing yet)."""
