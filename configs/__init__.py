"""The Hydra configs, installed inside the wheel as the package ``lmforge.configs``.

Hydra finds them there through its ``pkg://`` search path when lmforge does not run from a checkout.
"""
