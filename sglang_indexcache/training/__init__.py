"""Training: the embedded tiny model recipe and the multi-layer distillation loss."""
