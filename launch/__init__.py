"""Launcher: ``python launch/slurm.py --config NAME`` runs a config's trainer through submitit (SLURM or local)."""
