"""The memory hierarchy: the context window ("RAM") and the stores ("disk")."""
