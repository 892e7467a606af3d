"""The example configs, shipped with the package: ``vaelab train celeba_vae ...`` names one.

Each ``NAME.yaml`` here starts with a one-line description (its first comment line), which
``vaelab config --list`` shows; ``vaelab config NAME`` prints the file. Resolving a name is
``vaelab.config.resolve_config``'s job.
"""
