"""The model families, one module each, their parts and the building blocks they share."""
