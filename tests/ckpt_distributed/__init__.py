"""Scripts run as separate processes by tests/test_checkpoint_distributed.py (one per rank)."""
