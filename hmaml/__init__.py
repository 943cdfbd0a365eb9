"""HyperMAML training system."""
