"""The OpenAI-compatible HTTP API (FastAPI + uvicorn): ``pice-cloud serve``.

Split by job, as vLLM's entrypoints split theirs:

==============  =================================================================================
module          job
==============  =================================================================================
admission       bounded admission: ``max_concurrent`` run, ``max_queue`` wait, the rest get 429
state           `ApiState`, what the routes need, on ``app.state.pice`` (no module globals)
completion      one admitted chat completion: the service's events -> JSON or server-sent events
app             `create_app`: routes, authorisation, request parsing, errors in OpenAI's shape
runner          the socket, uvicorn with graceful shutdown, and `serve` (the whole command)
==============  =================================================================================

The request and response models (OpenAI's schema) are in `pice_cloud.openai_schema`.
"""

from pice_cloud.server.admission import Admission
from pice_cloud.server.app import create_app
from pice_cloud.server.runner import ApiServer, bind, install_sigterm_as_exit, running, serve, url_of
from pice_cloud.server.state import ApiState

__all__ = ["Admission", "ApiServer", "ApiState", "bind", "create_app", "install_sigterm_as_exit", "running", "serve",
           "url_of"]
