"""The PRS-Med service: BentoML REST app, gRPC front, fine-tuning jobs. Installed as ``prsmed_service``."""
