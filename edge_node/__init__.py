"""The healthNET edge node: trains the global model on a hospital's data, which never leaves."""
