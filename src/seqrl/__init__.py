"""seqrl: length-aware sequence-level RL benchmark suite."""
__version__ = "0.1.0"
