"""From photographs to vessel probabilities and masks: the Predictor, its settings, backends and binarisation."""
