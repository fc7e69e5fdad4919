"""hfrepair."""
