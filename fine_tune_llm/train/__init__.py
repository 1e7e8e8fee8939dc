"""Training: the SFT job, the preference stage, the TRL trainers with our guards, checkpoints, metrics export."""
