"""Data: reading and checking rows, the chat template and its answer masks, the split by question."""
