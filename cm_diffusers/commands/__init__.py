"""Sub-commands of `cm-diffusers`; one module each, discovered by `cm_diffusers.cli`."""
