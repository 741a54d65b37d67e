"""``memwatch demo``: a small DDPM trained on the bundled images (and portraits) with the monitor on."""
