"""Small helpers shared by every part of mmdit (atomic file writes)."""
