"""HTTP blueprints: /v1 (OpenAI), health, the OpenAPI document."""
