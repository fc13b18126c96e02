"""CPU-only speed work (what a run on a GPU never touches); its one entry point is `entry.py`."""
