"""Shared, plain-PyTorch building blocks of the latent-diffusion toolkit.

Modules take explicit arguments or their own dataclass; they never read argv, the
environment or globals, and never download anything. Training loops live in the
stage scripts at the repository root.
"""
