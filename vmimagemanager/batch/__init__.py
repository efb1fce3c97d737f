"""Batch-system adapters: each turns its system's hooks into calls on the life cycle."""
