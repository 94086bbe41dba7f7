"""The experiment harness: configs, the training runner, data, models, tracking (needs the `experiments` extra)."""
