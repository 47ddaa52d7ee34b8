"""Training on a rented cloud GPU through SkyPilot (``prsmed launch``; the ``prsmed[cloud]`` extra)."""
