"""Sub-commands of the `fmnist` CLI, one module each (see `app.cli`)."""
