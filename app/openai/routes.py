"""The OpenAI Images API: ``POST /v1/images/generations`` (JSON, or server-sent events with
``"stream": true``), ``GET /v1/images/files/{seed}.{format}`` (the images of ``response_format: "url"``),
and ``GET /v1/models`` (the list of ``GET /models``), so that ``OpenAI(base_url=".../v1")`` works.

Every error is in the service's one shape; a request that is invalid in any way is a 400, as OpenAI
answers (the SDK's ``BadRequestError``), where the service's own routes say 422.
"""

# No ``from __future__ import annotations``: FastAPI must see the per-app request model, which is
# local to build_router, as a real object rather than a string it cannot resolve.

import json
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.deps import ServingDep, SettingsDep
from app.errors import ApiError, ErrorResponse, error_responses, validation_message
from app.fields import Seed
from app.generation.routes import list_models, model_out
from app.generation.schemas import Limits, ModelList, ModelOut, request_models
from app.multipart import read_form
from app.openai import edits as openai_edits
from app.openai import serving as images
from app.openai.schemas import (
    MEDIA_TYPES,
    ImageFileQuery,
    ImageGenerateRequestBase,
    ImagesResponse,
    OutputFormat,
    edit_request_models,
    request_allowed,
    request_model,
)
from app.openai.urls import FILE_ROUTE
from app.uploads import UploadLimits

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
UPLOAD_PATHS = (EDITS, VARIATIONS)  # with the edits' body limit (Settings.edit_max_body_bytes)
ERRORS = error_responses(
    {
        400: "invalid request: the message names the field and what it accepts (a prompt naming no class or two)",
        401: "missing or wrong API key (when the server has one); for an image URL, a missing or wrong signature",
        404: "no such model (code model_not_found)",
        413: "request body too large",
        429: "the queue is full; retry after the Retry-After header's seconds",
        503: "the model is not loaded yet or the server is shutting down",
    }
) | {"4XX": {"model": ErrorResponse, "description": "never 422: every invalid request is a 400, as OpenAI answers"}}

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def openai_route(allowed: Mapping[str, str]) -> type[APIRoute]:
    """A route class whose validation errors and 422s are 400s; ``allowed`` names what each field accepts."""

    class OpenAIRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def openai_handler(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    message, param, code = validation_message(exc.errors(), allowed)
                    raise ApiError(400, message, code=code, param=param) from None
                except ApiError as err:
                    raise images.as_openai(err) from None

            return openai_handler

    return OpenAIRoute


async def wants_stream(request: Request) -> bool:
    """True when the body is a JSON object with ``"stream": true`` (the field is a strict boolean, so
    this and validation always agree)."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


def json_or_stream(
    route_class: type[APIRoute],
    path: str,
    stream_handler: Callable[..., Any],
    wants: Callable[[Request], Coroutine[Any, Any, bool]],
) -> type[APIRoute]:
    """A route class answering JSON, or ``stream_handler``'s server-sent events where ``wants(request)``.

    FastAPI encodes server-sent events (keep-alive pings included) only for a route declared as a stream,
    so the streaming answer is a second route on the same path, chosen per request."""
    stream_route = route_class(
        path, stream_handler, methods=["POST"], response_class=EventSourceResponse, include_in_schema=False
    )

    class JsonOrStream(route_class):  # type: ignore[valid-type,misc]
        def get_route_handler(self) -> Handler:
            as_json, as_stream = super().get_route_handler(), stream_route.get_route_handler()

            async def dispatch(request: Request) -> Response:
                return await (as_stream if await wants(request) else as_json)(request)

            return dispatch

    return JsonOrStream


def build_router(limits: Limits) -> APIRouter:
    """The router, with this app's request model (its bounds come from the settings)."""
    body_model = request_model(limits)
    generate_model, stream_model = request_models(limits)
    images_serving = images.ImagesServing(generate_model, stream_model)
    router = APIRouter(tags=["openai"], route_class=openai_route(request_allowed(body_model)))
    generations_routes(router, body_model, images_serving)
    edit_routes(router, limits)
    file_routes(router, images_serving)
    model_routes(router)
    return router


def generations_routes(
    router: APIRouter, body_model: type[ImageGenerateRequestBase], images_serving: images.ImagesServing
) -> None:
    """``POST /v1/images/generations``: JSON, or server-sent events when the body says ``"stream": true``."""
    route_class: type[APIRoute] = router.route_class

    async def open_stream(
        body: body_model,  # type: ignore[valid-type]
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> AsyncIterator[images.ImageStream]:
        async with images_serving.open_stream(body, request, serving, settings) as stream:
            yield stream

    async def generations_stream(
        stream: Annotated[images.ImageStream, Depends(open_stream)],
    ) -> AsyncIterator[ServerSentEvent]:
        async for event in images.stream_events(stream):
            yield event

    GenerationsRoute = json_or_stream(route_class, GENERATIONS, generations_stream, wants_stream)

    async def generations(body: body_model, request: Request, serving: ServingDep, settings: SettingsDep) -> Any:  # type: ignore[valid-type]
        """Sample ``n`` images of the class the ``prompt`` names, as OpenAI's Images API answers. With
        ``"stream": true`` the answer is server-sent events instead: ``image_generation.partial_image``
        (``partial_images`` of them per image, the model's x0 prediction at evenly spaced steps), then
        ``image_generation.completed`` per image, or ``error``. See docs/openai.md."""
        return await images_serving.generate(body, request, serving, settings)

    router.add_api_route(
        GENERATIONS,
        generations,
        methods=["POST"],
        route_class_override=GenerationsRoute,
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}, **ERRORS},
        summary="Create images (OpenAI's Images API)",
    )


async def wants_form_stream(request: Request) -> bool:
    """True when a multipart body's ``stream`` field is "true" (the body is read once and kept for the route)."""
    body = await request.body()
    type_ = request.headers.get("content-type", "")
    if not type_.lower().startswith("multipart/form-data") or b'name="stream"' not in body:
        return False

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    form = await read_form(chunks(), type_, UploadLimits(max_images=64, max_bytes=len(body) + 1), ("image", "mask"))
    return [v.strip().lower() for v in form.fields.get("stream", [])][-1:] == ["true"]


def edit_routes(router: APIRouter, limits: Limits) -> None:
    """``POST /v1/images/edits`` (JSON, or server-sent events with ``stream``) and ``/v1/images/variations``,
    multipart as the SDK sends them."""
    edit_model, variation_model = edit_request_models(limits)
    route_class: type[APIRoute] = router.route_class

    async def open_stream(
        request: Request, serving: ServingDep, settings: SettingsDep
    ) -> AsyncIterator[images.ImageStream]:
        async with openai_edits.open_edit_stream(edit_model, request, serving, settings) as stream:
            yield stream

    async def edits_stream(
        stream: Annotated[images.ImageStream, Depends(open_stream)],
    ) -> AsyncIterator[ServerSentEvent]:
        async for event in images.stream_events(stream):
            yield event

    EditsRoute = json_or_stream(route_class, EDITS, edits_stream, wants_form_stream)

    async def edits(request: Request, serving: ServingDep, settings: SettingsDep) -> Any:
        """Edit one image as OpenAI's Images API does (multipart: ``image``, optional ``mask`` whose transparent
        pixels mark the area to redraw, ``prompt`` naming the class, ``n``, ``size``, ``output_format``,
        ``stream`` with ``partial_images``, and ``seed``, ``sampler``, ``steps``, ``guidance``, ``strength``).
        Without a mask the edit is a variation steered toward the prompt's class. See docs/openai.md."""
        return await openai_edits.edit(edit_model, request, serving, settings)

    router.add_api_route(
        EDITS,
        edits,
        methods=["POST"],
        route_class_override=EditsRoute,
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream"}, **ERRORS},
        summary="Edit an image (OpenAI's Images API)",
    )

    @router.post(
        VARIATIONS,
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="Variations of an image (OpenAI's Images API)",
    )
    async def variations(request: Request, serving: ServingDep, settings: SettingsDep) -> Any:
        """Variations of one image (multipart: ``image``, ``n``, ``size``, ``response_format``; ``seed``,
        ``sampler``, ``steps``, ``guidance``, ``strength``): the class is the project classifier's reading of
        the image, the strength 0.6 unless given."""
        return await openai_edits.variation(variation_model, request, serving, settings)


def file_routes(router: APIRouter, images_serving: images.ImagesServing) -> None:
    @router.get(
        "/v1/images/files/{seed}.{output_format}",
        name=FILE_ROUTE,
        response_class=Response,
        responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **ERRORS},
        summary="An image of a url answer, drawn again",
    )
    async def image_file(
        seed: Seed,
        output_format: OutputFormat,
        query: Annotated[ImageFileQuery, Query()],
        request: Request,
        serving: ServingDep,
        settings: SettingsDep,
    ) -> Response:
        """The image of a ``response_format: "url"`` answer: its query holds the model, class, sampler,
        steps, guidance and size, so any replica draws the same bytes again. Needs no API key; when the
        server has one, only URLs it signed (``sig``) draw anything."""
        return await images_serving.image_file(seed, output_format, query, request, serving, settings)


def model_routes(router: APIRouter) -> None:
    """``GET /v1/models``, the list of ``GET /models``, and one entry of it, for the SDK's ``models``."""
    router.add_api_route(
        "/v1/models", list_models, methods=["GET"], response_model=ModelList, summary="The served models (OpenAI's)"
    )

    @router.get(
        "/v1/models/{model_id}",
        response_model=ModelOut,
        responses=error_responses({401: "missing or wrong API key", 404: "no such model (code model_not_found)"}),
        summary="One served model",
    )
    async def model(model_id: str, serving: ServingDep) -> ModelOut:
        """One entry of ``GET /v1/models``; 404 (``model_not_found``) for an id this server does not serve."""
        served = serving.model(model_id)
        return model_out(served, served.name == serving.default.name, serving.device)
