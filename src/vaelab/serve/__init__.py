"""``vaelab serve``: explore trained runs' latent spaces live in a browser (docs/serve.md).

One page (``static/``: an HTML file, a script and a style sheet, shipped inside the package;
nothing is loaded from the network) and the JSON/PNG API it uses, which scripts can call too.
``runs`` loads what is shown of each run; ``app`` is the Starlette app and the uvicorn server.
"""

from vaelab.serve.app import create_app, serve, serving
from vaelab.serve.runs import ServedRun, load_runs

__all__ = ["ServedRun", "create_app", "load_runs", "serve", "serving"]
