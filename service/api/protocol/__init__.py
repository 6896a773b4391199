"""Request and response bodies (pydantic), one module per front end: they are the OpenAPI schema."""
