"""fam: the FAM diffusion sampler on diffusers (temporary; the sampler engineer
replaces this with the real exports)."""

__version__ = "0.1.0"
