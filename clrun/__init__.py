"""clrun: a config-driven experiment runner for continual-learning research."""
