"""A local web page for looking at a backbone's features (`opendino demo --backbone X`): upload an image or pick a
bundled example and see the PCA colours, the foreground, the class-token attention (mean and per head), the depth
and segmentation of linear heads trained by the evaluation suite, the similarity of a clicked patch to every patch
of one or two images, and the patches matched between two images.

`Demo` (service.py) computes the views with `opendino.viz` and returns JSON-ready dicts with PNG data URLs; it
needs no web package. `create_app` / `serve` (server.py) wrap it in a FastAPI app serving a static page
(static/: HTML, CSS and plain JavaScript, nothing from other hosts) and need `pip install 'opendino[demo]'`.
The example photos (examples/) are public-domain or CC0 pictures from scikit-image; examples.json gives each one's
source and licence.
"""

from opendino.demo.server import create_app, serve
from opendino.demo.service import Demo, FeatureCache, InputError, Upload, examples

__all__ = ["Demo", "FeatureCache", "InputError", "Upload", "create_app", "examples", "serve"]
