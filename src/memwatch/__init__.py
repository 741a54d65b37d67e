"""memwatch: watch diffusion models while they train and warn when they begin to memorize.

``import memwatch`` is light: heavy optional libraries (open_clip, facenet-pytorch, torchvision)
load only when an embedder needs them.
"""

__version__ = "0.1.0"
