"""The healthNET aggregator: folds hospitals' weight deltas into global model versions."""
