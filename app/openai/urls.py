"""Image URLs for ``response_format: "url"`` that point at nothing stored.

The service draws byte-identical images for the same model, seed and parameters, whichever replica
and whatever else shares the device, so a URL can carry the recipe instead of a file id:
``GET /v1/images/files/{seed}.{format}?model=..&class=..&sampler=..&steps=..&guidance=..&size=..``
(and ``guidance_method=autoguidance`` for an autoguided image) draws the image again, on any replica
behind Ray Serve's proxy or a load balancer, for as long as a replica serves a model of that name.
Nothing is kept, so nothing expires or needs cleaning up.

A browser fetching the URL sends no ``Authorization`` header, so the route needs no API key; when the
server has one, the URL carries ``sig``, an HMAC-SHA256 of the recipe keyed by the API key, and only a
URL this server signed draws anything. Changing the key invalidates every URL handed out before.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import astuple, dataclass

FILE_ROUTE = "openai_image_file"  # the route's name, for request.url_for
_DOMAIN = b"fashion-diffusion image url\0"  # the key also authenticates requests: sign only in this context


@dataclass(frozen=True)
class Recipe:
    """Everything that decides an image's bytes."""

    model: str
    label: int
    seed: int
    sampler: str
    steps: int
    guidance: float
    size: int  # side in pixels
    output_format: str
    output_compression: int | None
    guidance_method: str = "classifier-free"

    def signature(self, secret: str) -> str:
        fields = astuple(self)
        if self.guidance_method == "classifier-free":  # signed as before the field existed: old URLs stay valid
            fields = fields[:-1]
        message = _DOMAIN + json.dumps(fields).encode()
        digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def signed_by(self, secret: str, sig: str | None) -> bool:
        return sig is not None and hmac.compare_digest(sig.encode(), self.signature(secret).encode())

    def path_params(self) -> dict[str, str]:
        return {"seed": str(self.seed), "output_format": self.output_format}

    def query(self, secret: str | None) -> dict[str, str]:
        """The URL's query: the rest of the recipe, and ``sig`` when the server has a key."""
        query = {
            "model": self.model,
            "class": str(self.label),
            "sampler": self.sampler,
            "steps": str(self.steps),
            "guidance": repr(self.guidance),
            "size": str(self.size),
        }
        if self.output_compression is not None:
            query["output_compression"] = str(self.output_compression)
        if self.guidance_method != "classifier-free":
            query["guidance_method"] = self.guidance_method
        if secret is not None:
            query["sig"] = self.signature(secret)
        return query
