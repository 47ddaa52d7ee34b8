"""Client for the PRS-Med service. Its pydantic models are the wire contract the service uses."""

__version__ = "0.1.0"
