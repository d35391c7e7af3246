"""Old home of the dataset layer, kept only for certssb/runner/stream.py's `IMAGE_EXTENSIONS` import.

Everything now lives in the `certssb.data` package (see its __init__.py). Delete
this module once stream.py lists images with `certssb.data.images.list_images`.
"""
from .images import IMAGE_EXTENSIONS  # noqa: F401
