"""The training core: a study-agnostic loop over compiled, replica-vmapped blocks."""
