"""The training loop shared by every stage that updates weights, and its pieces."""
