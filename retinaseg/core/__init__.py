"""What every layer uses: user errors and the checks of settings, Hydra setup, safe file writing, machine facts."""
