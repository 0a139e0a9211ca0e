"""The inference pipeline: a request resolved to a model, prepared, bounded, audited,
run and answered, in one place (pipeline.py), with its audit pair (audit_pair.py).

``init_app`` attaches it to the app, and lets go of a request's model lease when its
response is done: at once for a plain answer, when the last byte leaves (or the client
leaves) for a stream, which keeps the model from being unloaded under it."""

from __future__ import annotations

from flask import Flask, Response

from appliance import context
from appliance.inference.pipeline import Pipeline

EXTENSION = "appliance.pipeline"


def init_app(app: Flask, pipeline: Pipeline) -> Pipeline:
    app.extensions[EXTENSION] = pipeline

    @app.after_request
    def _release_lease(response: Response) -> Response:
        ctx = context.current()
        if not response.is_streamed:  # the model's work is done: the answer is in hand
            if ctx.lease is not None:
                ctx.lease.release()
            return response

        def release() -> None:  # the lease as it is then: a stream may take it later
            if ctx.lease is not None:
                ctx.lease.release()

        response.call_on_close(release)
        return response

    @app.teardown_request
    def _release_on_error(exc: BaseException | None) -> None:
        ctx = context.existing()
        if ctx is not None and ctx.lease is not None and exc is not None:
            ctx.lease.release()  # after_request did not run (release is idempotent)

    return pipeline


def get_pipeline(app: Flask) -> Pipeline:
    pipeline: Pipeline = app.extensions[EXTENSION]
    return pipeline
