"""The site role: one OpenAI-compatible endpoint on a site that keeps answering without the cloud.

``pice-cloud site`` runs on a device (or a small box) at a site (a factory floor, a vehicle, a
shop) whose edges share a site broker, usually bridged to the cloud's broker
(tools/mosquitto/bridge.conf). Applications on the site talk only to it:

    application --HTTP--> site --(cloud answers)--> cloud's API (progressive answers, cloud + edges)
                            \\--(cloud gone)-----> the site's own PICE service: a sketch by the
                                                   site's LLM, points on the site's peer edges over
                                                   the site broker; the device alone without peers

==========  ==================================================================================
module      job
==========  ==================================================================================
uplink      `Uplink`: whether the cloud answers (probes, failed requests, its MQTT heartbeat)
forward     `SiteForwarder`: ASGI middleware that forwards while the cloud answers, answers here
            when it does not, and finishes a stream the cloud dropped half-way
role        `site_role`: the two installed on a served system (metrics, ``/health``)
==========  ==================================================================================

The site's own service is the cloud's (`pice_cloud.service`) under its own ``cloud_id``
(``site-NAME``) on the site broker, with an LLM that runs on the ``edge`` extra (``llm.kind:
edge``: an onnxruntime or TensorRT runtime; or ``llm.kind: openai`` on a llama.cpp server):
no torch. Answers say where they were computed in ``pice.served_by``: ``cloud``, ``site``
(across peer edges), ``device`` (the site device alone), ``cloud+site`` (a stream the cloud
dropped, finished here).
"""

from pice_cloud.site.forward import SiteForwarder
from pice_cloud.site.role import site_role
from pice_cloud.site.uplink import Switch, Uplink

__all__ = ["SiteForwarder", "Switch", "Uplink", "site_role"]
