"""What the notebooks show (masked rows, tables) and the paths they use."""
