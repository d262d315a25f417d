"""Study protocols composed from the training core (one module per study)."""
